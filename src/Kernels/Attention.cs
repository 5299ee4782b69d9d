using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace MiniLlm.Kernels;

/// <summary>Element type of the KV cache: fp32, or bf16 (half the memory, keys and values rounded to nearest even).</summary>
public enum KvType { F32, BF16 }

/// <summary>
/// Where one layer's keys and values live. Positions come in tiles of <see cref="Tile"/> (16, one Vector512 of
/// fp32): a full tile's keys are stored transposed, [g][hd][16], so the scores of 16 keys are hd broadcast-FMAs with
/// no horizontal sums; its values are plain rows, [16][g·hd]. Tiles are contiguous (no block table) or found through
/// a block table (paged cache: one block = one tile). Elements are fp32 or bf16 (<see cref="Type"/>).
/// <para>
/// The tile still being filled keeps its keys as plain rows too, [r][g·hd], and is transposed once when its last
/// position arrives: a decode step writing one position straight into a transposed tile touched g·hd cache lines
/// (768 at stories110m shapes, each a read-for-ownership from DRAM once the weights have streamed past), which took
/// ~4 µs per layer and token at batch 16. Readers tell the two layouts apart by the cache's length
/// (<see cref="KeysAreRows"/>): positions are only ever appended.
/// </para>
/// </summary>
public readonly unsafe struct KvView
{
    public const int Tile = 16;

    public readonly byte* K;             // tile t's keys at K + phys(t)·TileBytes
    public readonly byte* V;             // tile t's values at V + phys(t)·TileBytes
    public readonly int* BlockTable;     // null: phys(t) = t; else phys(t) = BlockTable[t]
    public readonly int KvDim;           // g·hd elements per position
    public readonly KvType Type;

    public KvView(float* k, float* v, int kvDim, int* blockTable = null) : this((byte*)k, (byte*)v, kvDim, KvType.F32, blockTable) { }

    public KvView(byte* k, byte* v, int kvDim, KvType type, int* blockTable = null)
    {
        K = k; V = v; KvDim = kvDim; Type = type; BlockTable = blockTable;
    }

    public static int SizeOf(KvType t) => t == KvType.F32 ? 4 : 2;
    public int ElementBytes => SizeOf(Type);
    public long TileBytes => (long)Tile * KvDim * ElementBytes;

    private long Phys(int tile) => BlockTable == null ? tile : BlockTable[tile];

    /// <summary>Keys of tile <paramref name="tile"/>: [g·hd][16], element e of the key at position 16·tile + r at [e·16 + r].</summary>
    public nint KeyTile(int tile) => (nint)(K + Phys(tile) * TileBytes);

    /// <summary>Values of tile <paramref name="tile"/>: [16][g·hd].</summary>
    public nint ValueTile(int tile) => (nint)(V + Phys(tile) * TileBytes);

    public nint ValueRow(int pos) => ValueTile(pos / Tile) + (nint)((long)(pos % Tile) * KvDim * ElementBytes);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private void Store(nint p, long i, float v)
    {
        if (Type == KvType.F32) ((float*)p)[i] = v;
        else ((ushort*)p)[i] = Bf16.FromFloat(v);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private float Load(nint p, long i) => Type == KvType.F32 ? ((float*)p)[i] : Bf16.ToFloat(((ushort*)p)[i]);

    /// <summary>Whether tile <paramref name="tile"/> of a cache holding <paramref name="length"/> positions keeps its keys as rows (it is not full).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static bool KeysAreRows(int tile, int length) => (tile + 1) * Tile > length;

    /// <summary>
    /// Stores the key and value rows ([g·hd] each) of position <paramref name="pos"/>, the next one after those
    /// stored: the key as a row of its unfinished tile, which is transposed when this position completes it.
    /// </summary>
    public void Write(int pos, float* key, float* value)
    {
        nint kt = KeyTile(pos / Tile);
        int r = pos % Tile;
        StoreRow(kt + (nint)((long)r * KvDim * ElementBytes), key, 0, KvDim);
        if (r == Tile - 1) TransposeKeys(kt);
        StoreRow(ValueRow(pos), value, 0, KvDim);
    }

    /// <summary>Elements [e0, e1) of a row: src[e] → element e of the row at <paramref name="dst"/>.</summary>
    private void StoreRow(nint dst, float* src, int e0, int e1)
    {
        if (Type == KvType.F32) new ReadOnlySpan<float>(src + e0, e1 - e0).CopyTo(new Span<float>((float*)dst + e0, e1 - e0));
        else for (int e = e0; e < e1; e++) ((ushort*)dst)[e] = Bf16.FromFloat(src[e]);
    }

    /// <summary>A full tile's keys, [16][g·hd] rows → [g·hd][16], through a copy on the stack (16 · g·hd elements).</summary>
    /// <remarks>
    /// Compiled optimized at its first call: it runs once every 16 positions, too rarely for tiered compilation to
    /// promote it soon. That first call costs milliseconds of JIT time, so model warm-ups complete a tile.
    /// </remarks>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    [SkipLocalsInit]   // the copy is overwritten whole
    private void TransposeKeys(nint kt)
    {
        long bytes = TileBytes;
        byte[]? rented = bytes > 128 << 10 ? System.Buffers.ArrayPool<byte>.Shared.Rent((int)bytes) : null;
        Span<byte> copy = rented ?? stackalloc byte[(int)bytes];
        new ReadOnlySpan<byte>((void*)kt, (int)bytes).CopyTo(copy);
        fixed (byte* c = copy)
        {
            int kvd = KvDim, e = 0;
            if (Type == KvType.F32 && System.Runtime.Intrinsics.X86.Avx512F.IsSupported)
            {
                float* src = (float*)c, dst = (float*)kt;
                for (; e + 16 <= kvd; e += 16) Transpose.Block16(src + e, src + 8L * kvd + e, kvd, dst + (long)e * Tile, Tile);
            }
            for (; e < kvd; e++)
                for (int r = 0; r < Tile; r++)
                {
                    if (Type == KvType.F32) ((float*)kt)[(long)e * Tile + r] = ((float*)c)[(long)r * kvd + e];
                    else ((ushort*)kt)[(long)e * Tile + r] = ((ushort*)c)[(long)r * kvd + e];
                }
        }
        if (rented != null) System.Buffers.ArrayPool<byte>.Shared.Return(rented);
    }

    /// <summary>
    /// Stores <paramref name="count"/> consecutive positions from <paramref name="pos0"/> (the next ones after those
    /// stored); k and v are [count × g·hd]. Whole tiles go straight into the transposed layout, each line of keys
    /// written once; the rest position by position (<see cref="Write"/>).
    /// </summary>
    public void WriteRows(int pos0, int count, float* key, float* value)
    {
        int kvd = KvDim, i = 0;
        while (i < count)
        {
            int pos = pos0 + i;
            if (pos % Tile == 0 && count - i >= Tile)
            {
                WriteTileColumns(pos / Tile, key + (long)i * kvd, value + (long)i * kvd, kvd, 0, kvd);
                i += Tile;
            }
            else
            {
                Write(pos, key + (long)i * kvd, value + (long)i * kvd);
                i++;
            }
        }
    }

    /// <summary>
    /// Stores elements [e0, e1) of position <paramref name="pos"/>'s key and value rows (one thread's KV heads in a
    /// tensor-parallel decode). A key that completes its tile is not transposed here: every thread first copies its
    /// columns out (<see cref="CopyKeyColumns"/>), then, after all have, writes them back transposed
    /// (<see cref="StoreKeyColumns"/>) — the transposed tile overwrites rows holding the other threads' columns.
    /// </summary>
    public void WriteRowPart(int pos, float* key, float* value, int e0, int e1)
    {
        StoreRow(KeyTile(pos / Tile) + (nint)((long)(pos % Tile) * KvDim * ElementBytes), key, e0, e1);
        StoreRow(ValueRow(pos), value, e0, e1);
    }

    /// <summary>
    /// Elements [e0, e1) of the 16 positions of tile <paramref name="tile"/>, all new (one thread's KV heads in a
    /// tensor-parallel prefill): keys straight into the transposed layout, values into their rows. key and value
    /// are [16 × ld] rows, element e of position 16·tile + r at [r·ld + e].
    /// </summary>
    public void WriteTileColumns(int tile, float* key, float* value, int ld, int e0, int e1)
    {
        nint kt = KeyTile(tile), vt = ValueTile(tile);
        int e = e0;
        if (Type == KvType.F32 && System.Runtime.Intrinsics.X86.Avx512F.IsSupported)
            for (; e + 16 <= e1; e += 16) Transpose.Block16(key + e, key + 8L * ld + e, ld, (float*)kt + (long)e * Tile, Tile);
        for (; e < e1; e++)
            for (int r = 0; r < Tile; r++) Store(kt, (long)e * Tile + r, key[(long)r * ld + e]);
        for (int r = 0; r < Tile; r++) StoreRow(vt + (nint)((long)r * KvDim * ElementBytes), value + (long)r * ld, e0, e1);
    }

    /// <summary>Columns [e0, e1) of a full tile still held as rows → <paramref name="stage"/> [16][e1 − e0] (elements of the cache's type).</summary>
    public void CopyKeyColumns(int tile, int e0, int e1, byte* stage)
    {
        nint kt = KeyTile(tile);
        int n = e1 - e0, eb = ElementBytes;
        for (int r = 0; r < Tile; r++)
            new ReadOnlySpan<byte>((void*)(kt + (nint)(((long)r * KvDim + e0) * eb)), n * eb).CopyTo(new Span<byte>(stage + (long)r * n * eb, n * eb));
    }

    /// <summary>The staged columns (<see cref="CopyKeyColumns"/>) written into the tile's transposed layout, [e][16] for e in [e0, e1).</summary>
    public void StoreKeyColumns(int tile, int e0, int e1, byte* stage)
    {
        nint kt = KeyTile(tile);
        int n = e1 - e0;
        for (int e = e0; e < e1; e++)
            for (int r = 0; r < Tile; r++)
            {
                if (Type == KvType.F32) ((float*)kt)[(long)e * Tile + r] = ((float*)stage)[(long)r * n + e - e0];
                else ((ushort*)kt)[(long)e * Tile + r] = ((ushort*)stage)[(long)r * n + e - e0];
            }
    }

    /// <summary>Element <paramref name="e"/> of the key at <paramref name="pos"/> of a cache holding <paramref name="length"/> positions (for checks, not hot paths).</summary>
    public float KeyAt(int pos, int e, int length) => KeysAreRows(pos / Tile, length)
        ? Load(KeyTile(pos / Tile), (long)(pos % Tile) * KvDim + e)
        : Load(KeyTile(pos / Tile), (long)e * Tile + pos % Tile);

    /// <summary>Element <paramref name="e"/> of the value at <paramref name="pos"/>.</summary>
    public float ValueAt(int pos, int e) => Load(ValueRow(pos), e);
}

/// <summary>fp32 ↔ bf16, round to nearest even (NaN kept a quiet NaN).</summary>
public static class Bf16
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ushort FromFloat(float f)
    {
        uint u = BitConverter.SingleToUInt32Bits(f);
        if ((u & 0x7fffffff) > 0x7f800000) return (ushort)((u >> 16) | 0x40);
        return (ushort)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ToFloat(ushort b) => BitConverter.UInt32BitsToSingle((uint)b << 16);
}

/// <summary>One sequence's part of an attention call: its rows in q/output, the position of the first, and its KV.</summary>
public readonly struct AttentionSegment(int row, int count, int start, KvView kv)
{
    public readonly int Row = row;        // first row of this sequence in q and output
    public readonly int Count = count;    // new tokens of this sequence
    public readonly int Start = start;    // position of the first of them
    public readonly KvView Kv = kv;       // keys/values for positions 0..Start+Count−1, already written
}

/// <summary>
/// Causal grouped-query attention for the new tokens of one or more sequences, each token over keys 0..its own
/// position of its own sequence. One chunk = up to four rows of one sequence × a run of consecutive query heads;
/// the scores of one row live in per-worker scratch of context length, so no S×S matrix is ever built. Runs of
/// heads rather than single heads because a decode step's KV is cold (the weights streamed through the caches
/// since it was written): consecutive heads' key tiles and value slices are adjacent in memory, so a run reads
/// one long stream the hardware prefetcher can follow instead of many 256-byte pieces.
/// </summary>
public sealed unsafe class Attention : ParallelJob
{
    private readonly WorkerPool _pool;
    private const int RowsPerChunk = 4;   // query rows that share each key/value tile load
    private readonly float[][] _scores;   // per worker: [RowsPerChunk × maxContext (padded to tiles)]
    private readonly int _stride;         // floats between two rows' scores
    private AttentionSegment[] _segments = new AttentionSegment[1];
    private int[] _firstChunk = new int[2];   // prefix sums of row groups · head runs per segment
    private int _segmentCount, _headRun, _runs;
    private int _scoreRows = RowsPerChunk;    // rows of scores each worker's scratch holds
    private nint[] _qHead = new nint[1], _outHead = new nint[1];   // per query head: its column block in row 0 of q / output
    private int _ld;                                                // floats between two rows of q (and of output)
    private int _heads, _kvHeads, _headDim;
    private float _scale;

    public int MaxContext { get; }

    /// <summary>Chunks each worker should get (load balance), before rounding runs of heads up to whole KV groups.</summary>
    private const int ChunksPerWorker = 4;

    /// <summary>Multiply-adds (rows × heads × keys × hd) below which a call runs on the calling thread alone.</summary>
    private const long SerialWork = 1 << 14;

    /// <summary>Every row takes the single-row path, so its result cannot depend on which rows share its work item.</summary>
    public bool BatchInvariant { get; set; }

    public Attention(WorkerPool pool, int maxContext)
    {
        PrepareSplitPath();
        _pool = pool;
        MaxContext = maxContext;
        _scores = new float[pool.Threads][];
        _unfinished = new byte[pool.Threads][];
        _transposedIn = new long[pool.Threads][];
        for (int i = 0; i < pool.Threads; i++) { _unfinished[i] = []; _transposedIn[i] = []; }
        _stride = (maxContext + KvView.Tile - 1) / KvView.Tile * KvView.Tile;
        for (int i = 0; i < _scores.Length; i++) _scores[i] = GC.AllocateUninitializedArray<float>(RowsPerChunk * _stride, pinned: true);
    }

    /// <summary>One sequence: rows 0..s−1 at positions start..start+s−1.</summary>
    public void Run(float* q, int s, int start, int heads, int kvHeads, int headDim, in KvView kv, float* output) =>
        Run(q, heads, kvHeads, headDim, [new AttentionSegment(0, s, start, kv)], output);

    /// <param name="q">[T × heads·hd], RoPE already applied; T = Σ segment counts.</param>
    /// <param name="output">[T × heads·hd].</param>
    public void Run(float* q, int heads, int kvHeads, int headDim, ReadOnlySpan<AttentionSegment> segments, float* output)
    {
        EnsureSegments(segments.Length);
        EnsureScoreRows(heads, headDim);
        long work = 0, groups = 0;
        foreach (var g in segments) groups += (g.Count + RowsPerChunk - 1) / RowsPerChunk;
        // Heads per chunk: as many as still leave about four chunks per worker.
        _headRun = (int)Math.Clamp(groups * heads / (ChunksPerWorker * _pool.Threads), 1, heads);
        // Whole KV groups per chunk: the query heads of one KV head read the same keys and values.
        int group = heads / Math.Max(1, kvHeads);
        if (_headRun < group && heads % kvHeads == 0) _headRun = group;
        _runs = (heads + _headRun - 1) / _headRun;
        int chunks = 0;
        for (int i = 0; i < segments.Length; i++)
        {
            var g = segments[i];
            if (g.Start + g.Count > MaxContext)
                throw new ArgumentOutOfRangeException(nameof(segments), $"positions up to {g.Start + g.Count} exceed the attention scratch ({MaxContext})");
            _segments[i] = g;
            _firstChunk[i] = chunks;
            chunks += (g.Count + RowsPerChunk - 1) / RowsPerChunk * _runs;
            work += (long)g.Count * heads * (g.Start + g.Count) * headDim;
        }
        _firstChunk[segments.Length] = chunks;
        _segmentCount = segments.Length;
        SetCall(q, heads, kvHeads, headDim, output);
        PlanUnfinishedTiles();
        if (work < SerialWork) { for (int c = 0; c < chunks; c++) Execute(c, 0); }
        else if (SplitsByPositions(segments)) RunParts(segments[0]);
        else _pool.Run(this, chunks);
    }

    /// <summary>
    /// One decode row (batch 1) is cut by positions rather than by heads: each thread takes a run of whole tiles for
    /// every head (flash-decoding), and the parts' softmax sums are merged after (<see cref="CombineParts"/>). Cut by
    /// heads, each thread read a few KiB of keys per tile and head and a few hundred bytes of values per position and
    /// head, hundreds of short pieces; cut by positions, each reads one run of whole tiles, keys and values each one
    /// contiguous stream. A decode step's KV is cold (the weights streamed through the caches since it was written):
    /// a C probe reading stories110m's KV at 93 positions after a 256 MiB flush read 26–30 GB/s in the heads' pattern
    /// and 32–52 GB/s in the positions' (two host speeds). The result depends on where the parts are cut, which follows the positions
    /// and the threads only, never timing. On by default; off cuts by heads (A/B runs).
    /// </summary>
    public static bool FlashDecode { get; set; } = true;

    /// <summary>
    /// The single-head ·V kernel walks 64 columns at a time where the head has them (on by default; off walks 32, for
    /// A/B runs). stories110m shapes from DRAM, one decode row split by positions, attention alone (12 layers, in-process
    /// alternation, 21 rounds): 0.926 of the time at 150 positions, 0.912 at 500.
    /// </summary>
    internal static bool WideValues { get; set; } = true;

    /// <summary>Fewest tiles each part of a split decode row gets.</summary>
    private const int MinTilesPerPart = 2;

    /// <summary>
    /// Fewest tiles a decode row must span to be split (32 positions: one tile has nothing to cut). Session 18 started
    /// at 256 from separate `minillm profile` runs (stories110m-f32, 29–93 positions: attention rows 15.5–18.0 ms
    /// against 14.8–15.5 by heads). Alternating in one process (29-token prompt, then 64 steps; 9–11 rounds), from 32
    /// positions against from 256: stories110m-bf16 attention 0.834, 0.808, the step 0.987, 0.970; fp32 attention
    /// 0.894, 0.874, the step 0.998, 0.984.
    /// </summary>
    private const int MinSplitTiles = 2;

    private bool SplitsByPositions(ReadOnlySpan<AttentionSegment> segments) =>
        FlashDecode && segments.Length == 1 && DecodesRow(segments[0]) && _pool.Threads > 1 &&
        (segments[0].Start + KvView.Tile) / KvView.Tile >= MinSplitTiles;

    private int _parts, _partTiles;          // this call's parts and the tiles they cut
    private float[][] _partOut = [], _partMax = [], _partSum = [];   // per part: Σ e·v [heads × hd], max and Σ e [heads]

    /// <summary>
    /// Parts a split decode row is cut into: a whole number per thread (up to four), each a run of at least
    /// <see cref="MinTilesPerPart"/> tiles, handed out to whichever thread is free. The cut follows the positions and
    /// the thread count only; the spread over the threads follows their speeds (this host's two vCPUs differ by
    /// 5–25 %: with one part per thread the faster waits for the slower).
    /// </summary>
    private int PartsFor(int tiles) => Math.Clamp(tiles / (MinTilesPerPart * _pool.Threads), 1, 4) * _pool.Threads;

    private void RunParts(in AttentionSegment seg)
    {
        _partTiles = (seg.Start + KvView.Tile) / KvView.Tile;
        _parts = PartsFor(_partTiles);
        _splitting = true;
        try { _pool.Run(this, _parts); }
        finally { _splitting = false; }
        CombineParts(seg.Row);
    }

    private bool _splitting;

    /// <summary>
    /// Compiles the split decode's own methods now (tiered compilation is off: each method is fully optimized at its
    /// first call, ~1 ms here), so the first split decode row does not pay it inside a timed step.
    /// </summary>
    private static void PrepareSplitPath()
    {
        if (_splitPathPrepared) return;
        _splitPathPrepared = true;
        const System.Reflection.BindingFlags flags = System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance;
        foreach (var name in new[] { nameof(RunParts), nameof(CombineParts), nameof(PartsFor), nameof(SplitsByPositions) })
            RuntimeHelpers.PrepareMethod(typeof(Attention).GetMethod(name, flags)!.MethodHandle);
    }

    private static bool _splitPathPrepared;

    /// <summary>
    /// o_h = Σ_p e^(m_p − M)·(Σ e·v)_p / Σ_p e^(m_p − M)·(Σ e)_p over the parts, M the largest of their maxima. Plain
    /// Vector512 loops (decode rows have hd % 16 = 0): TensorPrimitives' generic span overloads here cost ~10 ms of
    /// JIT at a process's first split row, inside its first long decode (`profile` timed it as attention).
    /// </summary>
    private void CombineParts(int row)
    {
        int hd = _headDim;
        for (int h = 0; h < _heads; h++)
        {
            float max = float.NegativeInfinity, sum = 0;
            for (int p = 0; p < _parts; p++) max = MathF.Max(max, _partMax[p][h]);
            float* o = O(row, h);
            for (int p = 0; p < _parts; p++)
            {
                float f = MathF.Exp(_partMax[p][h] - max);
                sum += f * _partSum[p][h];
                var fv = Vector512.Create(f);
                fixed (float* part = &_partOut[p][h * hd])
                    for (int c = 0; c < hd; c += 16)
                    {
                        var x = Vector512.Load(part + c) * fv;
                        (p == 0 ? x : x + Vector512.Load(o + c)).Store(o + c);
                    }
            }
            var inv = Vector512.Create(1f / sum);
            for (int c = 0; c < hd; c += 16) (Vector512.Load(o + c) * inv).Store(o + c);
        }
    }

    /// <summary>Whether segment rows take <see cref="DecodeRow"/> (one new token; its unfinished tile's keys read as rows) rather than <see cref="Head"/>.</summary>
    private bool DecodesRow(in AttentionSegment seg) =>
        seg.Count == 1 && !BatchInvariant && SimdPolicy.Current == SimdPolicy.Isa.V512 && _headDim % 16 == 0;

    /// <summary>
    /// Lays out, for every segment that takes <see cref="Head"/> and ends inside a tile, room in each worker's
    /// <see cref="_unfinished"/> for that tile's keys transposed per KV head ([hd][16], zero past the keys it holds),
    /// at <see cref="_unfinishedAt"/>[segment] (−1: none); a worker transposes a KV head's tile the first time one of
    /// its chunks of this call needs it (<see cref="UnfinishedKeys"/>). Transposed per chunk and head instead, a
    /// 29-token prefill transposed the same 4 tiles 64 times: a third of its attention time. Attention alone at
    /// tiny-kjv shapes (29 rows, KV in cache, in-process alternation, medians of 40 rounds): 22.0 → 14.8 µs a call on
    /// one thread, 14.9 → 10.9 on two; 87 rows 1–3 % less. The whole 29-token prefill: 0.992 of the time (21 rounds,
    /// noise 0.96–1.00). Transposed once by the caller instead, the other core read them across every call: 15.5 µs.
    /// </summary>
    private void PlanUnfinishedTiles()
    {
        if (_unfinishedAt.Length < _segmentCount) _unfinishedAt = new long[_segments.Length];
        long bytes = 0;
        for (int i = 0; i < _segmentCount; i++)
        {
            ref readonly var seg = ref _segments[i];
            bool unfinished = (seg.Start + seg.Count) % KvView.Tile != 0 && !DecodesRow(seg);
            _unfinishedAt[i] = unfinished ? bytes : -1;
            if (unfinished) bytes += (long)_kvHeads * _headDim * KvView.Tile * seg.Kv.ElementBytes;
        }
        _call++;
        if (bytes == 0) return;
        int slots = _segmentCount * _kvHeads;
        for (int w = 0; w < _unfinished.Length; w++)
        {
            if (_unfinished[w].Length < bytes) _unfinished[w] = GC.AllocateUninitializedArray<byte>((int)Math.Max(bytes, 2L * _unfinished[w].Length), pinned: true);
            if (_transposedIn[w].Length < slots) _transposedIn[w] = new long[Math.Max(slots, 2 * _transposedIn[w].Length)];
        }
    }

    /// <summary>Segment si's unfinished key tile for KV head kvh, transposed in worker's buffer (at its first use this call).</summary>
    private nint UnfinishedKeys(int si, int kvh, int worker, byte* buffer)
    {
        var kv = _segments[si].Kv;
        int length = _segments[si].Start + _segments[si].Count, eb = kv.ElementBytes;
        byte* dst = buffer + _unfinishedAt[si] + (long)kvh * _headDim * KvView.Tile * eb;
        ref long stamp = ref _transposedIn[worker][si * _kvHeads + kvh];
        if (stamp != _call)
        {
            TransposePartial(kv.KeyTile(length / KvView.Tile) + (nint)((long)kvh * _headDim * eb), (long)kv.KvDim * eb, length % KvView.Tile, _headDim, eb, dst);
            stamp = _call;
        }
        return (nint)dst;
    }

    private readonly byte[][] _unfinished;        // per worker: unfinished key tiles, transposed (see PlanUnfinishedTiles)
    private readonly long[][] _transposedIn;      // per worker, per segment × KV head: the call that last transposed it there
    private long[] _unfinishedAt = new long[1];   // per segment: byte offset into each worker's _unfinished, or −1
    private long _call;                           // Run calls so far

    /// <summary>
    /// A decode chunk keeps every head's scores of its run: per-worker scratch of at least that many rows. Also sizes
    /// the split decode's part buffers (<see cref="RunParts"/>) for the most parts, once per shape, so a decode that
    /// reaches the split (MinSplitTiles) allocates nothing then.
    /// </summary>
    private void EnsureScoreRows(int heads, int headDim)
    {
        int most = 4 * _pool.Threads;
        if (_partOut.Length < most || _partOut[0].Length < heads * headDim || _partMax[0].Length < heads)
        {
            _partOut = new float[most][];
            _partMax = new float[most][];
            _partSum = new float[most][];
            for (int i = 0; i < most; i++)
            {
                _partOut[i] = GC.AllocateUninitializedArray<float>(heads * headDim, pinned: true);
                _partMax[i] = new float[heads];
                _partSum[i] = new float[heads];
            }
        }
        if (_scoreRows >= heads) return;
        _scoreRows = Math.Max(RowsPerChunk, heads);
        for (int i = 0; i < _scores.Length; i++) _scores[i] = GC.AllocateUninitializedArray<float>(_scoreRows * _stride, pinned: true);
    }

    /// <summary>
    /// Sets up one decode row for <see cref="DecodeHeads"/>, which several threads then call on disjoint runs of
    /// heads (tensor-parallel decode: each thread attends with the KV heads whose keys and values it wrote itself).
    /// </summary>
    public void PrepareDecode(float* q, int heads, int kvHeads, int headDim, float* output)
    {
        CheckDecodeByHeads(heads, kvHeads, headDim);
        SetCall(q, heads, kvHeads, headDim, output);
    }

    /// <summary><see cref="PrepareDecode(float*, int, int, int, float*)"/> with q and output in blocks of heads, one per thread (see <see cref="SetCall(ReadOnlySpan{nint}, int, int, int, ReadOnlySpan{nint})"/>).</summary>
    public void PrepareDecode(ReadOnlySpan<nint> qBlocks, int heads, int kvHeads, int headDim, ReadOnlySpan<nint> outBlocks)
    {
        CheckDecodeByHeads(heads, kvHeads, headDim);
        SetCall(qBlocks, heads, kvHeads, headDim, outBlocks);
    }

    private void CheckDecodeByHeads(int heads, int kvHeads, int headDim)
    {
        if (heads % kvHeads != 0 || headDim % 16 != 0 || SimdPolicy.Current != SimdPolicy.Isa.V512)
            throw new ArgumentException($"decode by head runs needs whole KV groups, head_dim a multiple of 16 and V512 (heads {heads}, kv heads {kvHeads}, head_dim {headDim})");
        EnsureScoreRows(heads, headDim);
    }

    /// <summary>
    /// Sets up a pass's rows for <see cref="PrefillHeads"/>, which several threads then call on disjoint runs of heads
    /// (tensor-parallel passes: each thread attends with the KV heads it wrote itself): <paramref name="perLayer"/>
    /// segments per layer, layer by layer, each a sequence's rows of q and output with that layer's KV (one sequence's
    /// prompt: one segment a layer, all with the same rows; a batch: one a sequence, the same rows in every layer).
    /// </summary>
    public void PreparePrefill(float* q, int heads, int kvHeads, int headDim, ReadOnlySpan<AttentionSegment> segments, float* output, int perLayer = 1)
    {
        CheckPrefillByHeads(heads, kvHeads, headDim, segments, perLayer);
        SetCall(q, heads, kvHeads, headDim, output);
    }

    /// <summary><see cref="PreparePrefill(float*, int, int, int, ReadOnlySpan{AttentionSegment}, float*, int)"/> with q and output in blocks of heads, one per thread.</summary>
    public void PreparePrefill(ReadOnlySpan<nint> qBlocks, int heads, int kvHeads, int headDim, ReadOnlySpan<AttentionSegment> segments, ReadOnlySpan<nint> outBlocks, int perLayer = 1)
    {
        CheckPrefillByHeads(heads, kvHeads, headDim, segments, perLayer);
        SetCall(qBlocks, heads, kvHeads, headDim, outBlocks);
    }

    /// <summary>Checks and keeps a pass's segments (<paramref name="perLayer"/> a layer) and plans their unfinished tiles.</summary>
    private void CheckPrefillByHeads(int heads, int kvHeads, int headDim, ReadOnlySpan<AttentionSegment> segments, int perLayer)
    {
        if (heads % kvHeads != 0) throw new ArgumentException($"heads ({heads}) must be whole groups of the KV heads ({kvHeads})");
        if (perLayer < 1 || segments.Length % perLayer != 0)
            throw new ArgumentException($"{segments.Length} segments are not whole layers of {perLayer}", nameof(perLayer));
        EnsureSegments(segments.Length);
        for (int i = 0; i < segments.Length; i++)
        {
            var g = segments[i];
            if (g.Count < 1) throw new ArgumentException("every segment needs a row", nameof(segments));
            if (g.Start + g.Count > MaxContext)
                throw new ArgumentOutOfRangeException(nameof(segments), $"positions up to {g.Start + g.Count} exceed the attention scratch ({MaxContext})");
            _segments[i] = g;
        }
        _segmentCount = segments.Length;
        _perLayer = perLayer;
        EnsureScoreRows(heads, headDim);
        _heads = heads; _kvHeads = kvHeads; _headDim = headDim;   // PlanUnfinishedTiles reads the shapes
        PlanUnfinishedTiles();
    }

    private int _perLayer = 1;   // segments a layer in the prepared pass

    /// <summary>
    /// Query heads h0..h1 of every row of layer <paramref name="layer"/>'s segments (<see cref="PreparePrefill"/>), on
    /// the calling thread: a one-row segment (a decode step) as <see cref="DecodeHeads"/> runs it, the others in
    /// groups of four rows.
    /// </summary>
    public void PrefillHeads(int layer, int h0, int h1, int worker)
    {
        for (int si = layer * _perLayer, end = si + _perLayer; si < end; si++)
        {
            if (DecodesRow(_segments[si]))
            {
                DecodeRow(_segments[si], h0, h1, worker);
                continue;
            }
            int groups = (_segments[si].Count + RowsPerChunk - 1) / RowsPerChunk;
            bool f32 = _segments[si].Kv.Type == KvType.F32;
            for (int g = 0; g < groups; g++)
                for (int h = h0; h < h1; h++)
                {
                    if (f32) Head<F32Load>(si, g, h, worker);
                    else Head<Bf16Load>(si, g, h, worker);
                }
        }
    }

    /// <summary>Room for <paramref name="n"/> segments and their first chunks.</summary>
    private void EnsureSegments(int n)
    {
        if (_segments.Length >= n) return;
        _segments = new AttentionSegment[n];
        _firstChunk = new int[n + 1];
    }

    /// <summary>This call's q, output and shapes, which every chunk reads: q and output [rows × heads·hd].</summary>
    private void SetCall(float* q, int heads, int kvHeads, int headDim, float* output)
    {
        SetShapes(heads, kvHeads, headDim);
        for (int h = 0; h < heads; h++) { _qHead[h] = (nint)(q + (long)h * headDim); _outHead[h] = (nint)(output + (long)h * headDim); }
        _ld = heads * headDim;
    }

    /// <summary>
    /// This call's q and output in blocks of heads, as threads that each own a run of heads keep them (tensor-parallel
    /// passes): block b holds heads [b·n, (b+1)·n), n = heads ÷ blocks, as [rows × n·hd] at qBlocks[b] / outBlocks[b].
    /// Each thread's activations then share no cache line, nor a neighbouring one, with another thread's: rows of one
    /// shared array interleave the threads' columns, and the hardware prefetchers, following one thread's row to its
    /// end, pull in the next row's lines that the other thread is writing (RoPE alone ran 7–10× slower that way).
    /// </summary>
    private void SetCall(ReadOnlySpan<nint> qBlocks, int heads, int kvHeads, int headDim, ReadOnlySpan<nint> outBlocks)
    {
        if (qBlocks.Length == 0 || heads % qBlocks.Length != 0 || outBlocks.Length != qBlocks.Length)
            throw new ArgumentException($"{heads} heads in {qBlocks.Length} q blocks and {outBlocks.Length} output blocks: one block per equal run of heads");
        SetShapes(heads, kvHeads, headDim);
        int n = heads / qBlocks.Length;
        for (int h = 0; h < heads; h++)
        {
            _qHead[h] = qBlocks[h / n] + (nint)((long)(h % n) * headDim * sizeof(float));
            _outHead[h] = outBlocks[h / n] + (nint)((long)(h % n) * headDim * sizeof(float));
        }
        _ld = n * headDim;
    }

    private void SetShapes(int heads, int kvHeads, int headDim)
    {
        _heads = heads; _kvHeads = kvHeads; _headDim = headDim;
        _scale = 1f / MathF.Sqrt(headDim);
        if (_qHead.Length < heads) { _qHead = new nint[heads]; _outHead = new nint[heads]; }   // grows once, at the first call of a model
    }

    /// <summary>
    /// Query heads h0..h1 of the decode row at position <paramref name="pos"/> (row 0 of q and output from
    /// <see cref="PrepareDecode"/>), on the calling thread, with worker <paramref name="worker"/>'s scratch.
    /// </summary>
    public void DecodeHeads(in KvView kv, int pos, int h0, int h1, int worker)
    {
        if (pos + 1 > MaxContext) throw new ArgumentOutOfRangeException(nameof(pos), $"position {pos} exceeds the attention scratch ({MaxContext})");
        DecodeRow(new AttentionSegment(0, 1, pos, kv), h0, h1, worker);
    }

    /// <summary>Heads h0..h1 of a one-row segment, by the KV cache's element type, in worker's scratch.</summary>
    private void DecodeRow(in AttentionSegment seg, int h0, int h1, int worker)
    {
        fixed (float* scratch = _scores[worker])
        {
            if (seg.Kv.Type == KvType.F32) DecodeRow<F32Load>(seg, h0, h1, scratch);
            else DecodeRow<Bf16Load>(seg, h0, h1, scratch);
        }
    }

    public override void Execute(int chunk, int worker)
    {
        if (_splitting)
        {
            fixed (float* scratch = _scores[worker])
            {
                int t0 = chunk * _partTiles / _parts, t1 = (chunk + 1) * _partTiles / _parts;
                if (_segments[0].Kv.Type == KvType.F32) DecodeRow<F32Load>(_segments[0], 0, _heads, scratch, t0, t1, chunk);
                else DecodeRow<Bf16Load>(_segments[0], 0, _heads, scratch, t0, t1, chunk);
            }
            return;
        }
        int si = 0;
        while (_firstChunk[si + 1] <= chunk) si++;   // few segments: a linear walk is cheapest
        int local = chunk - _firstChunk[si];
        int g = local / _runs, h0 = local % _runs * _headRun, h1 = Math.Min(_heads, h0 + _headRun);
        if (DecodesRow(_segments[si]))
        {
            DecodeRow(_segments[si], h0, h1, worker);
            return;
        }
        for (int h = h0; h < h1; h++)
        {
            if (_segments[si].Kv.Type == KvType.F32) Head<F32Load>(si, g, h, worker);
            else Head<Bf16Load>(si, g, h, worker);
        }
    }

    /// <summary>Rows of row group <paramref name="g"/> of segment <paramref name="si"/>, query head <paramref name="h"/>.</summary>
    private void Head<TL>(int si, int g, int h, int worker) where TL : IWeightLoad
    {
        ref readonly var seg = ref _segments[si];
        int t0 = g * RowsPerChunk, rows = Math.Min(RowsPerChunk, seg.Count - t0);
        int hd = _headDim, kvh = h / (_heads / _kvHeads);
        var kv = seg.Kv;
        int eb = kv.ElementBytes;
        int lastKeys = seg.Start + t0 + rows;                 // the group's last row sees the most keys
        int tiles = (lastKeys + KvView.Tile - 1) / KvView.Tile;
        nint kHead = (nint)((long)kvh * hd * KvView.Tile * eb);
        bool four = rows == RowsPerChunk && SimdPolicy.Current == SimdPolicy.Isa.V512 && !BatchInvariant;
        fixed (float* scratch = _scores[worker])
        fixed (byte* unfinished = _unfinished[worker])
        {
            // scores[i][j] = q_i·k_j / √hd: with four rows, each key tile row is loaded once for all four queries.
            float* q0 = Q(seg.Row + t0, h);
            int length = seg.Start + seg.Count;
            for (int tile = 0; tile < tiles; tile++)
            {
                // The unfinished tile, transposed (UnfinishedKeys), so its scores come out of the same kernel, bit
                // for bit, as they will once the tile is full (batch-invariant mode relies on it).
                nint kt = KvView.KeysAreRows(tile, length) ? UnfinishedKeys(si, kvh, worker, unfinished) : kv.KeyTile(tile) + kHead;
                if (four && TwoTiles && tile + 1 < tiles)
                {
                    int next = tile + 1;
                    nint kt1 = KvView.KeysAreRows(next, length) ? UnfinishedKeys(si, kvh, worker, unfinished) : kv.KeyTile(next) + kHead;
                    TileScores4x2<TL>(q0, _ld, kt, kt1, hd, _scale, scratch + tile * KvView.Tile, _stride);
                    tile = next;
                }
                else if (four) TileScores4<TL>(q0, _ld, kt, hd, _scale, scratch + tile * KvView.Tile, _stride);
                else
                    for (int i = 0; i < rows; i++) TileScores<TL>(Q(seg.Row + t0 + i, h), kt, hd, _scale, scratch + i * _stride + tile * KvView.Tile);
            }
            // Causal softmax per row; probabilities past a row's own position are zero, so the rows can share ·V.
            if (four) FastExp.CausalSoftmax4(scratch, _stride, seg.Start + t0 + 1, lastKeys);
            else
                for (int i = 0; i < rows; i++) FastExp.CausalSoftmax(scratch + i * _stride, seg.Start + t0 + i + 1, lastKeys);
            // o_i = Σ_j p_i[j] · v_j
            if (four && hd % 32 == 0) WeightedSum4<TL>(kv, kvh * hd, hd, scratch, _stride, lastKeys, O(seg.Row + t0, h), _ld);
            else
                for (int i = 0; i < rows; i++)
                {
                    int keys = seg.Start + t0 + i + 1;
                    float* o = O(seg.Row + t0 + i, h);
                    float* sp = scratch + i * _stride;
                    if (SimdPolicy.Current == SimdPolicy.Isa.V512 && hd % 32 == 0) WeightedSumV512<TL>(kv, kvh * hd, hd, sp, keys, o);
                    else
                    {
                        new Span<float>(o, hd).Clear();
                        long rowBytes = (long)kv.KvDim * eb;
                        for (int tile = 0; tile * KvView.Tile < keys; tile++)
                        {
                            nint vt = kv.ValueTile(tile) + (nint)((long)kvh * hd * eb);
                            int n = Math.Min(KvView.Tile, keys - tile * KvView.Tile);
                            for (int r = 0; r < n; r++) Axpy<TL>(o, vt + (nint)(r * rowBytes), sp[tile * KvView.Tile + r], hd);
                        }
                    }
                }
        }
    }

    /// <summary>
    /// A decode row (a segment of one token) × query heads h0..h1: keys tile by tile with the run's heads inner (one
    /// forward stream through the tiles), then per head a softmax and its weighted sum of values with the output
    /// held in registers. With <paramref name="part"/> ≥ 0 only tiles [tile0, tile1) (one part of a split decode,
    /// <see cref="FlashDecode"/>): each head's max score, sum of exponentials and unnormalized Σ e_j·v_j go to that
    /// part's buffers for <see cref="CombineParts"/>.
    /// </summary>
    private void DecodeRow<TL>(in AttentionSegment seg, int h0, int h1, float* scratch, int tile0 = 0, int tile1 = int.MaxValue, int part = -1) where TL : IWeightLoad
    {
        int hd = _headDim, group = _heads / _kvHeads, length = seg.Start + 1;
        tile1 = Math.Min(tile1, (length + KvView.Tile - 1) / KvView.Tile);
        int keys = Math.Min(length, tile1 * KvView.Tile) - tile0 * KvView.Tile;   // this call's keys, from tile0
        var kv = seg.Kv;
        long headBytes = (long)hd * kv.ElementBytes;
        for (int tile = tile0; tile < tile1; tile++)
        {
            nint kt = kv.KeyTile(tile);
            int at = (tile - tile0) * KvView.Tile;
            if (KvView.KeysAreRows(tile, length))
            {
                for (int h = h0; h < h1; h++)
                    RowScores<TL>(Q(seg.Row, h), kt + (nint)(h / group * headBytes), (long)kv.KvDim * kv.ElementBytes, length - tile * KvView.Tile, hd, _scale, scratch + (h - h0) * _stride + at);
                continue;
            }
            for (int h = h0; h < h1; h++)
            {
                nint kh = kt + (nint)(h / group * headBytes * KvView.Tile);
                float* dst = scratch + (h - h0) * _stride + at;
                if (Paired(h, h1, group)) TileScoresPair<TL>(Q(seg.Row, h), Q(seg.Row, ++h), kh, hd, _scale, dst, dst + _stride);
                else TileScores<TL>(Q(seg.Row, h), kh, hd, _scale, dst);
            }
        }
        // Softmax with its division moved onto the output: e_j = exp(s_j − max) and their sum in one pass
        // (TensorPrimitives.SoftMax computes every exponential twice, for the sum and again for the quotient,
        // through double precision), o = (Σ_j e_j·v_j) / Σ_j e_j. A part keeps its max and sum, and divides nothing.
        float* norm = stackalloc float[h1 - h0];
        for (int h = h0; h < h1; h++)
        {
            var e = new Span<float>(scratch + (h - h0) * _stride, keys);
            float max = TensorPrimitives.Max(e), sum = FastExp.ExpShiftedSum(e, max);
            if (part < 0) { norm[h - h0] = 1f / sum; continue; }
            norm[h - h0] = 1f;
            _partMax[part][h] = max;
            _partSum[part][h] = sum;
        }
        // o_h = Σ_j e_h[j]·v_j per head, its output in registers (decode runs need hd % 16 == 0; the ·V kernel
        // wants 32). Measured: 40–55 % faster than accumulating all heads through memory position by position,
        // both with the KV in cache (tiny-kjv) and cold in DRAM (stories110m shapes at 600 positions).
        fixed (float* partOut = part < 0 ? null : _partOut[part])
            for (int h = h0; h < h1; h++)
            {
                float* p = scratch + (h - h0) * _stride, o = part < 0 ? O(seg.Row, h) : partOut + (long)h * hd;
                float n = norm[h - h0];
                if (hd % 32 == 0 && Paired(h, h1, group))
                {
                    float* o1 = part < 0 ? O(seg.Row, h + 1) : partOut + (long)(h + 1) * hd;
                    WeightedSumPair<TL>(kv, h / group * hd, hd, p, p + _stride, keys, o, o1, n, norm[++h - h0], tile0);
                    continue;
                }
                if (hd == 64 && group == 1 && h + 1 < h1 && WideValues && TwoKvHeads)
                {
                    float* o1 = part < 0 ? O(seg.Row, h + 1) : partOut + (long)(h + 1) * hd;
                    WeightedSumTwoKvHeads<TL>(kv, h * hd, p, p + _stride, keys, o, o1, n, norm[++h - h0], tile0);
                    continue;
                }
                if (hd % 32 == 0) WeightedSumV512<TL>(kv, h / group * hd, hd, p, keys, o, n, tile0);
                else
                {
                    nint vh = (nint)(h / group * headBytes);
                    new Span<float>(o, hd).Clear();
                    for (int j = 0; j < keys; j++)
                    {
                        var pj = Vector512.Create(p[j]);
                        nint v = kv.ValueRow(tile0 * KvView.Tile + j) + vh;
                        for (int c = 0; c < hd; c += 16) Vector512.FusedMultiplyAdd(TL.Load512(v, c), pj, Vector512.Load(o + c)).Store(o + c);
                    }
                    TensorPrimitives.Multiply(new ReadOnlySpan<float>(o, hd), n, new Span<float>(o, hd));
                }
            }
    }

    /// <summary>
    /// Heads h and h + 1 share a KV head (GQA), so a decode run takes them together: each key row and value vector
    /// is loaded once for both (the pair kernels sum in the single-head kernels' order, so the results are the same
    /// bits).
    /// </summary>
    private static bool Paired(int h, int h1, int group) => PairHeads && group % 2 == 0 && h % 2 == 0 && h + 1 < h1;

    /// <summary>Take GQA head pairs together in decode (on by default; off for A/B measurements).</summary>
    public static bool PairHeads { get; set; } = true;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private float* Q(int row, int h) => (float*)_qHead[h] + (long)row * _ld;
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private float* O(int row, int h) => (float*)_outHead[h] + (long)row * _ld;

    /// <summary>Scores of four consecutive query rows (q0, q0+qStride, …) against one key tile: four chains, one load per tile row.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TileScores4<TL>(float* q0, int qStride, nint kt, int hd, float scale, float* dst, int dstStride) where TL : IWeightLoad
    {
        float* q1 = q0 + qStride, q2 = q1 + qStride, q3 = q2 + qStride;
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
        for (int i = 0; i < hd; i++)
        {
            var k = TL.Load512(kt, i * 16);
            a0 = Vector512.FusedMultiplyAdd(Vector512.Create(q0[i]), k, a0);
            a1 = Vector512.FusedMultiplyAdd(Vector512.Create(q1[i]), k, a1);
            a2 = Vector512.FusedMultiplyAdd(Vector512.Create(q2[i]), k, a2);
            a3 = Vector512.FusedMultiplyAdd(Vector512.Create(q3[i]), k, a3);
        }
        (a0 * scale).Store(dst);
        (a1 * scale).Store(dst + dstStride);
        (a2 * scale).Store(dst + 2 * dstStride);
        (a3 * scale).Store(dst + 3 * dstStride);
    }

    /// <summary>Take a prompt's key tiles two at a time in the four-row scores (on by default; off for A/B measurements).</summary>
    public static bool TwoTiles { get; set; } = true;

    /// <summary>
    /// <see cref="TileScores4"/> over two key tiles (kt0, then kt1 into dst + 16) at once: eight independent chains of
    /// hd FMAs where four left the FMA units waiting on their latency. Each score is summed in the same order, so the
    /// bits are <see cref="TileScores4"/>'s.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TileScores4x2<TL>(float* q0, int qStride, nint kt0, nint kt1, int hd, float scale, float* dst, int dstStride) where TL : IWeightLoad
    {
        float* q1 = q0 + qStride, q2 = q1 + qStride, q3 = q2 + qStride;
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
        for (int i = 0; i < hd; i++)
        {
            var k = TL.Load512(kt0, i * 16);
            var l = TL.Load512(kt1, i * 16);
            var x0 = Vector512.Create(q0[i]); var x1 = Vector512.Create(q1[i]); var x2 = Vector512.Create(q2[i]); var x3 = Vector512.Create(q3[i]);
            a0 = Vector512.FusedMultiplyAdd(x0, k, a0); b0 = Vector512.FusedMultiplyAdd(x0, l, b0);
            a1 = Vector512.FusedMultiplyAdd(x1, k, a1); b1 = Vector512.FusedMultiplyAdd(x1, l, b1);
            a2 = Vector512.FusedMultiplyAdd(x2, k, a2); b2 = Vector512.FusedMultiplyAdd(x2, l, b2);
            a3 = Vector512.FusedMultiplyAdd(x3, k, a3); b3 = Vector512.FusedMultiplyAdd(x3, l, b3);
        }
        (a0 * scale).Store(dst); (b0 * scale).Store(dst + KvView.Tile);
        (a1 * scale).Store(dst + dstStride); (b1 * scale).Store(dst + dstStride + KvView.Tile);
        (a2 * scale).Store(dst + 2 * dstStride); (b2 * scale).Store(dst + 2 * dstStride + KvView.Tile);
        (a3 * scale).Store(dst + 3 * dstStride); (b3 * scale).Store(dst + 3 * dstStride + KvView.Tile);
    }

    /// <summary>Four rows' o = Σ_j p[j]·v_j over the same keys (p zero past each row's own position): each value vector loaded once.</summary>
    private static void WeightedSum4<TL>(in KvView kv, int offset, int hd, float* p, int pStride, int keys, float* o, int oStride) where TL : IWeightLoad
    {
        long stride = (long)kv.KvDim * kv.ElementBytes;
        float* p1 = p + pStride, p2 = p1 + pStride, p3 = p2 + pStride;
        for (int c = 0; c < hd; c += 32)
        {
            Vector512<float> a0 = default, a1 = default, b0 = default, b1 = default, c0 = default, c1 = default, d0 = default, d1 = default;
            for (int tile = 0, j = 0; j < keys; tile++)
            {
                nint v = kv.ValueTile(tile) + (nint)((long)offset * kv.ElementBytes);
                int end = Math.Min(keys, j + KvView.Tile);
                for (; j < end; j++, v += (nint)stride)
                {
                    var lo = TL.Load512(v, c);
                    var hi = TL.Load512(v, c + 16);
                    var w = Vector512.Create(p[j]);
                    a0 = Vector512.FusedMultiplyAdd(lo, w, a0); a1 = Vector512.FusedMultiplyAdd(hi, w, a1);
                    w = Vector512.Create(p1[j]);
                    b0 = Vector512.FusedMultiplyAdd(lo, w, b0); b1 = Vector512.FusedMultiplyAdd(hi, w, b1);
                    w = Vector512.Create(p2[j]);
                    c0 = Vector512.FusedMultiplyAdd(lo, w, c0); c1 = Vector512.FusedMultiplyAdd(hi, w, c1);
                    w = Vector512.Create(p3[j]);
                    d0 = Vector512.FusedMultiplyAdd(lo, w, d0); d1 = Vector512.FusedMultiplyAdd(hi, w, d1);
                }
            }
            a0.Store(o + c); a1.Store(o + c + 16);
            b0.Store(o + oStride + c); b1.Store(o + oStride + c + 16);
            c0.Store(o + 2 * oStride + c); c1.Store(o + 2 * oStride + c + 16);
            d0.Store(o + 3 * oStride + c); d1.Store(o + 3 * oStride + c + 16);
        }
    }

    /// <summary>The first <paramref name="n"/> key rows (<paramref name="rowBytes"/> apart) of one head, hd elements of <paramref name="eb"/> bytes, → [hd][16], zero past n.</summary>
    private static void TransposePartial(nint rows, long rowBytes, int n, int hd, int eb, byte* dst)
    {
        n = Math.Min(n, KvView.Tile);
        new Span<byte>(dst, hd * KvView.Tile * eb).Clear();
        for (int r = 0; r < n; r++, rows += (nint)rowBytes)
            for (int i = 0; i < hd; i++)
            {
                if (eb == 4) ((float*)dst)[i * KvView.Tile + r] = ((float*)rows)[i];
                else ((ushort*)dst)[i * KvView.Tile + r] = ((ushort*)rows)[i];
            }
    }

    /// <summary>
    /// Scores of the first <paramref name="n"/> keys of an unfinished tile (at most 16), whose keys are rows
    /// <paramref name="rowBytes"/> apart from <paramref name="k"/>: one dot product each.
    /// </summary>
    private static void RowScores<TL>(float* q, nint k, long rowBytes, int n, int hd, float scale, float* dst) where TL : IWeightLoad
    {
        n = Math.Min(n, KvView.Tile);
        int r0 = 0;
        if (SimdPolicy.Current == SimdPolicy.Isa.V512 && hd % 16 == 0)
        {
            // Four keys at a time, their sums in one tree (SumTree512.Sums4): one Vector512.Sum per key cost
            // more than its hd/16 multiply-adds. stories110m fp32 decode, in-process alternation (9 rounds × 32
            // steps): b32 0.994, b64 0.985 of the step time; an attention harness (64 sequences × 20 positions, KV
            // in cache) 4–7 % less time a call.
            var vs = Vector128.Create(scale);
            for (; r0 + 4 <= n; r0 += 4, k += 4 * (nint)rowBytes)
            {
                Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
                nint k1 = k + (nint)rowBytes, k2 = k1 + (nint)rowBytes, k3 = k2 + (nint)rowBytes;
                for (int i = 0; i < hd; i += 16)
                {
                    var qv = Vector512.Load(q + i);
                    a0 = Vector512.FusedMultiplyAdd(qv, TL.Load512(k, i), a0);
                    a1 = Vector512.FusedMultiplyAdd(qv, TL.Load512(k1, i), a1);
                    a2 = Vector512.FusedMultiplyAdd(qv, TL.Load512(k2, i), a2);
                    a3 = Vector512.FusedMultiplyAdd(qv, TL.Load512(k3, i), a3);
                }
                (SumTree512.Sums4(a0, a1, a2, a3) * vs).Store(dst + r0);
            }
        }
        for (int r = r0; r < n; r++, k += (nint)rowBytes)
        {
            int i = 0;
            float s = 0;
            if (SimdPolicy.Current == SimdPolicy.Isa.V512)
            {
                var a = Vector512<float>.Zero;
                for (; i + 16 <= hd; i += 16) a = Vector512.FusedMultiplyAdd(Vector512.Load(q + i), TL.Load512(k, i), a);
                s = Vector512.Sum(a);
            }
            for (; i < hd; i++) s = MathF.FusedMultiplyAdd(q[i], TL.Load1(k, i), s);
            dst[r] = s * scale;
        }
    }

    /// <summary>16 scores from one transposed key tile [hd][16]: broadcast q[i] times row i of the tile.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TileScores<TL>(float* q, nint kt, int hd, float scale, float* dst) where TL : IWeightLoad
    {
        switch (SimdPolicy.Current)
        {
            case SimdPolicy.Isa.V512:
            {
                // Four chains so the FMA latency is hidden (one chain would wait 4 cycles per element).
                Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
                int i = 0;
                for (; i + 4 <= hd; i += 4)
                {
                    a0 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i]), TL.Load512(kt, i * 16), a0);
                    a1 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i + 1]), TL.Load512(kt, i * 16 + 16), a1);
                    a2 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i + 2]), TL.Load512(kt, i * 16 + 32), a2);
                    a3 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i + 3]), TL.Load512(kt, i * 16 + 48), a3);
                }
                for (; i < hd; i++) a0 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i]), TL.Load512(kt, i * 16), a0);
                ((a0 + a1 + (a2 + a3)) * scale).Store(dst);
                break;
            }
            case SimdPolicy.Isa.V256:
            {
                Vector256<float> a0 = Vector256<float>.Zero, a1 = Vector256<float>.Zero;
                for (int i = 0; i < hd; i++)
                {
                    var b = Vector256.Create(q[i]);
                    a0 = Vector256.FusedMultiplyAdd(b, TL.Load256(kt, i * 16), a0);
                    a1 = Vector256.FusedMultiplyAdd(b, TL.Load256(kt, i * 16 + 8), a1);
                }
                (a0 * scale).Store(dst);
                (a1 * scale).Store(dst + 8);
                break;
            }
            default:
                for (int c = 0; c < 16; c++)
                {
                    float s = 0;
                    for (int i = 0; i < hd; i++) s = MathF.FusedMultiplyAdd(q[i], TL.Load1(kt, i * 16 + c), s);
                    dst[c] = s * scale;
                }
                break;
        }
    }

    /// <summary><see cref="TileScores{TL}"/> (V512) for two query heads of one KV head: each key tile row loaded once.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TileScoresPair<TL>(float* qa, float* qb, nint kt, int hd, float scale, float* da, float* db) where TL : IWeightLoad
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
        int i = 0;
        for (; i + 4 <= hd; i += 4)
        {
            var k0 = TL.Load512(kt, i * 16);
            var k1 = TL.Load512(kt, i * 16 + 16);
            var k2 = TL.Load512(kt, i * 16 + 32);
            var k3 = TL.Load512(kt, i * 16 + 48);
            a0 = Vector512.FusedMultiplyAdd(Vector512.Create(qa[i]), k0, a0);
            b0 = Vector512.FusedMultiplyAdd(Vector512.Create(qb[i]), k0, b0);
            a1 = Vector512.FusedMultiplyAdd(Vector512.Create(qa[i + 1]), k1, a1);
            b1 = Vector512.FusedMultiplyAdd(Vector512.Create(qb[i + 1]), k1, b1);
            a2 = Vector512.FusedMultiplyAdd(Vector512.Create(qa[i + 2]), k2, a2);
            b2 = Vector512.FusedMultiplyAdd(Vector512.Create(qb[i + 2]), k2, b2);
            a3 = Vector512.FusedMultiplyAdd(Vector512.Create(qa[i + 3]), k3, a3);
            b3 = Vector512.FusedMultiplyAdd(Vector512.Create(qb[i + 3]), k3, b3);
        }
        for (; i < hd; i++)
        {
            var k = TL.Load512(kt, i * 16);
            a0 = Vector512.FusedMultiplyAdd(Vector512.Create(qa[i]), k, a0);
            b0 = Vector512.FusedMultiplyAdd(Vector512.Create(qb[i]), k, b0);
        }
        ((a0 + a1 + (a2 + a3)) * scale).Store(da);
        ((b0 + b1 + (b2 + b3)) * scale).Store(db);
    }

    /// <summary><see cref="WeightedSumV512{TL}"/> for two query heads of one KV head: each value vector loaded once.</summary>
    private static void WeightedSumPair<TL>(in KvView kv, int offset, int hd, float* pa, float* pb, int keys, float* oa, float* ob, float na, float nb, int firstTile = 0) where TL : IWeightLoad
    {
        long stride = (long)kv.KvDim * kv.ElementBytes;
        for (int c = 0; c < hd; c += 32)
        {
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
            for (int tile = firstTile, j = 0; j < keys; tile++)
            {
                nint v = kv.ValueTile(tile) + (nint)((long)offset * kv.ElementBytes);
                int end = Math.Min(keys, j + KvView.Tile);
                for (; j + 1 < end; j += 2, v += (nint)(2 * stride))
                {
                    var v0 = TL.Load512(v, c);
                    var v1 = TL.Load512(v, c + 16);
                    var w0 = TL.Load512(v + (nint)stride, c);
                    var w1 = TL.Load512(v + (nint)stride, c + 16);
                    var p = Vector512.Create(pa[j]);
                    a0 = Vector512.FusedMultiplyAdd(v0, p, a0); a1 = Vector512.FusedMultiplyAdd(v1, p, a1);
                    p = Vector512.Create(pb[j]);
                    b0 = Vector512.FusedMultiplyAdd(v0, p, b0); b1 = Vector512.FusedMultiplyAdd(v1, p, b1);
                    p = Vector512.Create(pa[j + 1]);
                    a2 = Vector512.FusedMultiplyAdd(w0, p, a2); a3 = Vector512.FusedMultiplyAdd(w1, p, a3);
                    p = Vector512.Create(pb[j + 1]);
                    b2 = Vector512.FusedMultiplyAdd(w0, p, b2); b3 = Vector512.FusedMultiplyAdd(w1, p, b3);
                }
                if (j < end)
                {
                    var v0 = TL.Load512(v, c);
                    var v1 = TL.Load512(v, c + 16);
                    var p = Vector512.Create(pa[j]);
                    a0 = Vector512.FusedMultiplyAdd(v0, p, a0); a1 = Vector512.FusedMultiplyAdd(v1, p, a1);
                    p = Vector512.Create(pb[j]);
                    b0 = Vector512.FusedMultiplyAdd(v0, p, b0); b1 = Vector512.FusedMultiplyAdd(v1, p, b1);
                    j++;
                }
            }
            ((a0 + a2) * na).Store(oa + c); ((a1 + a3) * na).Store(oa + c + 16);
            ((b0 + b2) * nb).Store(ob + c); ((b1 + b3) * nb).Store(ob + c + 16);
        }
    }

    /// <summary>
    /// o[0..hd) = Σ_j p[j] · v_j[offset..offset+hd), hd a multiple of 32: the output stays in registers, 32 floats
    /// at a time, with keys taken two at a time into separate accumulators (four independent FMA chains).
    /// </summary>
    /// <summary>
    /// Decode takes the values of two adjacent KV heads of 64 together when each query head has its own KV head (on by
    /// default; off for A/B runs). stories110m shapes from DRAM, in-process alternation: attention 0.923 and 0.956 of
    /// the time at 29–93 positions (bf16 weights, 9 rounds × 64 steps), 0.957 (fp32); from 400 positions, three pairs
    /// of runs, 835 → 787, 872 → 765, 852 → 720 µs a step (`/tmp/pp`).
    /// </summary>
    public static bool TwoKvHeads { get; set; } = true;

    /// <summary>
    /// <see cref="WeightedSumV512{TL}"/> for two query heads of 64 on two adjacent KV heads (no GQA sharing): each
    /// position's 512 bytes of both heads in one visit, half the strided walks over the value rows. Each head's sums
    /// run in the single-head kernel's order (even positions into a, odd into b): the same bits.
    /// </summary>
    private static void WeightedSumTwoKvHeads<TL>(in KvView kv, int offset, float* pa, float* pb, int keys, float* oa, float* ob, float na, float nb, int firstTile) where TL : IWeightLoad
    {
        long stride = (long)kv.KvDim * kv.ElementBytes;
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, d0 = default, d1 = default, d2 = default, d3 = default;
        for (int tile = firstTile, j = 0; j < keys; tile++)
        {
            nint v = kv.ValueTile(tile) + (nint)((long)offset * kv.ElementBytes);
            int end = Math.Min(keys, j + KvView.Tile);
            for (; j + 1 < end; j += 2, v += (nint)(2 * stride))
            {
                nint w = v + (nint)stride;
                var pj = Vector512.Create(pa[j]);
                var pk = Vector512.Create(pa[j + 1]);
                a0 = Vector512.FusedMultiplyAdd(TL.Load512(v, 0), pj, a0);
                a1 = Vector512.FusedMultiplyAdd(TL.Load512(v, 16), pj, a1);
                a2 = Vector512.FusedMultiplyAdd(TL.Load512(v, 32), pj, a2);
                a3 = Vector512.FusedMultiplyAdd(TL.Load512(v, 48), pj, a3);
                b0 = Vector512.FusedMultiplyAdd(TL.Load512(w, 0), pk, b0);
                b1 = Vector512.FusedMultiplyAdd(TL.Load512(w, 16), pk, b1);
                b2 = Vector512.FusedMultiplyAdd(TL.Load512(w, 32), pk, b2);
                b3 = Vector512.FusedMultiplyAdd(TL.Load512(w, 48), pk, b3);
                pj = Vector512.Create(pb[j]);
                pk = Vector512.Create(pb[j + 1]);
                c0 = Vector512.FusedMultiplyAdd(TL.Load512(v, 64), pj, c0);
                c1 = Vector512.FusedMultiplyAdd(TL.Load512(v, 80), pj, c1);
                c2 = Vector512.FusedMultiplyAdd(TL.Load512(v, 96), pj, c2);
                c3 = Vector512.FusedMultiplyAdd(TL.Load512(v, 112), pj, c3);
                d0 = Vector512.FusedMultiplyAdd(TL.Load512(w, 64), pk, d0);
                d1 = Vector512.FusedMultiplyAdd(TL.Load512(w, 80), pk, d1);
                d2 = Vector512.FusedMultiplyAdd(TL.Load512(w, 96), pk, d2);
                d3 = Vector512.FusedMultiplyAdd(TL.Load512(w, 112), pk, d3);
            }
            if (j < end)
            {
                var pj = Vector512.Create(pa[j]);
                a0 = Vector512.FusedMultiplyAdd(TL.Load512(v, 0), pj, a0);
                a1 = Vector512.FusedMultiplyAdd(TL.Load512(v, 16), pj, a1);
                a2 = Vector512.FusedMultiplyAdd(TL.Load512(v, 32), pj, a2);
                a3 = Vector512.FusedMultiplyAdd(TL.Load512(v, 48), pj, a3);
                pj = Vector512.Create(pb[j]);
                c0 = Vector512.FusedMultiplyAdd(TL.Load512(v, 64), pj, c0);
                c1 = Vector512.FusedMultiplyAdd(TL.Load512(v, 80), pj, c1);
                c2 = Vector512.FusedMultiplyAdd(TL.Load512(v, 96), pj, c2);
                c3 = Vector512.FusedMultiplyAdd(TL.Load512(v, 112), pj, c3);
                j++;
            }
        }
        ((a0 + b0) * na).Store(oa);
        ((a1 + b1) * na).Store(oa + 16);
        ((a2 + b2) * na).Store(oa + 32);
        ((a3 + b3) * na).Store(oa + 48);
        ((c0 + d0) * nb).Store(ob);
        ((c1 + d1) * nb).Store(ob + 16);
        ((c2 + d2) * nb).Store(ob + 32);
        ((c3 + d3) * nb).Store(ob + 48);
    }

    private static void WeightedSumV512<TL>(in KvView kv, int offset, int hd, float* p, int keys, float* o, float norm = 1f, int firstTile = 0) where TL : IWeightLoad
    {
        long stride = (long)kv.KvDim * kv.ElementBytes;   // bytes from one position's values to the next
        int c = 0;
        if (WideValues)
            for (; c + 64 <= hd; c += 64)
            {
                // 64 columns a walk (a head of 64 in one): each position's 256 bytes in one visit, not two. Each
                // column's sum runs in the same order as in the 32-column walk below: the same bits.
                Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
                for (int tile = firstTile, j = 0; j < keys; tile++)
                {
                    nint v = kv.ValueTile(tile) + (nint)((long)offset * kv.ElementBytes);
                    int end = Math.Min(keys, j + KvView.Tile);
                    for (; j + 1 < end; j += 2, v += (nint)(2 * stride))
                    {
                        var pj = Vector512.Create(p[j]);
                        var pk = Vector512.Create(p[j + 1]);
                        nint w = v + (nint)stride;
                        a0 = Vector512.FusedMultiplyAdd(TL.Load512(v, c), pj, a0);
                        a1 = Vector512.FusedMultiplyAdd(TL.Load512(v, c + 16), pj, a1);
                        a2 = Vector512.FusedMultiplyAdd(TL.Load512(v, c + 32), pj, a2);
                        a3 = Vector512.FusedMultiplyAdd(TL.Load512(v, c + 48), pj, a3);
                        b0 = Vector512.FusedMultiplyAdd(TL.Load512(w, c), pk, b0);
                        b1 = Vector512.FusedMultiplyAdd(TL.Load512(w, c + 16), pk, b1);
                        b2 = Vector512.FusedMultiplyAdd(TL.Load512(w, c + 32), pk, b2);
                        b3 = Vector512.FusedMultiplyAdd(TL.Load512(w, c + 48), pk, b3);
                    }
                    if (j < end)
                    {
                        var pj = Vector512.Create(p[j]);
                        a0 = Vector512.FusedMultiplyAdd(TL.Load512(v, c), pj, a0);
                        a1 = Vector512.FusedMultiplyAdd(TL.Load512(v, c + 16), pj, a1);
                        a2 = Vector512.FusedMultiplyAdd(TL.Load512(v, c + 32), pj, a2);
                        a3 = Vector512.FusedMultiplyAdd(TL.Load512(v, c + 48), pj, a3);
                        j++;
                    }
                }
                ((a0 + b0) * norm).Store(o + c);
                ((a1 + b1) * norm).Store(o + c + 16);
                ((a2 + b2) * norm).Store(o + c + 32);
                ((a3 + b3) * norm).Store(o + c + 48);
            }
        for (; c < hd; c += 32)
        {
            Vector512<float> a0 = default, a1 = default, b0 = default, b1 = default;
            for (int tile = firstTile, j = 0; j < keys; tile++)
            {
                nint v = kv.ValueTile(tile) + (nint)((long)offset * kv.ElementBytes);
                int end = Math.Min(keys, j + KvView.Tile);
                for (; j + 1 < end; j += 2, v += (nint)(2 * stride))
                {
                    var pj = Vector512.Create(p[j]);
                    var pk = Vector512.Create(p[j + 1]);
                    a0 = Vector512.FusedMultiplyAdd(TL.Load512(v, c), pj, a0);
                    a1 = Vector512.FusedMultiplyAdd(TL.Load512(v, c + 16), pj, a1);
                    b0 = Vector512.FusedMultiplyAdd(TL.Load512(v + (nint)stride, c), pk, b0);
                    b1 = Vector512.FusedMultiplyAdd(TL.Load512(v + (nint)stride, c + 16), pk, b1);
                }
                if (j < end)
                {
                    var pj = Vector512.Create(p[j]);
                    a0 = Vector512.FusedMultiplyAdd(TL.Load512(v, c), pj, a0);
                    a1 = Vector512.FusedMultiplyAdd(TL.Load512(v, c + 16), pj, a1);
                    j++;
                }
            }
            ((a0 + b0) * norm).Store(o + c);   // × 1 is exact: the prefill rows pass probabilities already divided
            ((a1 + b1) * norm).Store(o + c + 16);
        }
    }

    /// <summary>o[0..n) += p · v[0..n).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Axpy<TL>(float* o, nint v, float p, int n) where TL : IWeightLoad
    {
        int c = 0;
        if (SimdPolicy.Current == SimdPolicy.Isa.V512)
        {
            var pv = Vector512.Create(p);
            for (; c + 16 <= n; c += 16) Vector512.FusedMultiplyAdd(TL.Load512(v, c), pv, Vector512.Load(o + c)).Store(o + c);
        }
        else if (SimdPolicy.Current == SimdPolicy.Isa.V256)
        {
            var pv = Vector256.Create(p);
            for (; c + 8 <= n; c += 8) Vector256.FusedMultiplyAdd(TL.Load256(v, c), pv, Vector256.Load(o + c)).Store(o + c);
        }
        for (; c < n; c++) o[c] = MathF.FusedMultiplyAdd(TL.Load1(v, c), p, o[c]);
    }
}
