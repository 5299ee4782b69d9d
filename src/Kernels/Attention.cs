using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace MiniLlm.Kernels;

/// <summary>
/// Where one layer's keys and values live. Positions come in tiles of <see cref="Tile"/> (16, one Vector512 of
/// fp32): a tile's keys are stored transposed, [g][hd][16], so the scores of 16 keys are hd broadcast-FMAs with no
/// horizontal sums; its values are plain rows, [16][g·hd]. Tiles are contiguous (no block table) or found through
/// a block table (paged cache: one block = one tile).
/// </summary>
public readonly unsafe struct KvView
{
    public const int Tile = 16;

    public readonly float* K;            // tile t's keys at K + phys(t)·TileFloats
    public readonly float* V;            // tile t's values at V + phys(t)·TileFloats
    public readonly int* BlockTable;     // null: phys(t) = t; else phys(t) = BlockTable[t]
    public readonly int KvDim;           // g·hd floats per position

    public KvView(float* k, float* v, int kvDim, int* blockTable = null)
    {
        K = k; V = v; KvDim = kvDim; BlockTable = blockTable;
    }

    public long TileFloats => (long)Tile * KvDim;

    private long Phys(int tile) => BlockTable == null ? tile : BlockTable[tile];

    /// <summary>Keys of tile <paramref name="tile"/>: [g·hd][16], element e of the key at position 16·tile + r at [e·16 + r].</summary>
    public float* KeyTile(int tile) => K + Phys(tile) * TileFloats;

    /// <summary>Values of tile <paramref name="tile"/>: [16][g·hd].</summary>
    public float* ValueTile(int tile) => V + Phys(tile) * TileFloats;

    public float* ValueRow(int pos) => ValueTile(pos / Tile) + (long)(pos % Tile) * KvDim;

    /// <summary>Stores the key and value rows ([g·hd] each) of position <paramref name="pos"/>.</summary>
    public void Write(int pos, float* key, float* value)
    {
        float* kt = KeyTile(pos / Tile) + pos % Tile;
        for (int e = 0; e < KvDim; e++) kt[(long)e * Tile] = key[e];
        new ReadOnlySpan<float>(value, KvDim).CopyTo(new Span<float>(ValueRow(pos), KvDim));
    }

    /// <summary>
    /// Stores <paramref name="count"/> consecutive positions from <paramref name="pos0"/>; k and v are [count × g·hd].
    /// Whole tiles go through a block transpose that writes each 64-byte line of keys once.
    /// </summary>
    public void WriteRows(int pos0, int count, float* key, float* value)
    {
        int kvd = KvDim, i = 0;
        while (i < count)
        {
            int pos = pos0 + i;
            if (pos % Tile == 0 && count - i >= Tile)
            {
                float* kt = KeyTile(pos / Tile);
                float* src = key + (long)i * kvd;
                for (int e = 0; e < kvd; e++, kt += Tile)
                {
                    float* s = src + e;
                    for (int r = 0; r < Tile; r++) kt[r] = s[(long)r * kvd];
                }
                new ReadOnlySpan<float>(value + (long)i * kvd, Tile * kvd).CopyTo(new Span<float>(ValueTile(pos / Tile), Tile * kvd));
                i += Tile;
            }
            else
            {
                Write(pos, key + (long)i * kvd, value + (long)i * kvd);
                i++;
            }
        }
    }

    /// <summary>Element <paramref name="e"/> of the key at <paramref name="pos"/> (for checks, not hot paths).</summary>
    public float KeyAt(int pos, int e) => KeyTile(pos / Tile)[(long)e * Tile + pos % Tile];
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
/// position of its own sequence. One chunk = one (token, query head); the scores of one row live in per-worker
/// scratch of context length, so no S×S matrix is ever built.
/// </summary>
public sealed unsafe class Attention : ParallelJob
{
    private readonly WorkerPool _pool;
    private readonly float[][] _scores;   // per worker: [maxContext]
    private AttentionSegment[] _segments = new AttentionSegment[1];
    private int[] _firstChunk = new int[2];   // prefix sums of Count·heads per segment
    private int _segmentCount;
    private float* _q, _out;
    private int _heads, _kvHeads, _headDim;
    private float _scale;

    public int MaxContext { get; }

    public Attention(WorkerPool pool, int maxContext)
    {
        _pool = pool;
        MaxContext = maxContext;
        _scores = new float[pool.Threads][];
        int padded = (maxContext + KvView.Tile - 1) / KvView.Tile * KvView.Tile;
        for (int i = 0; i < _scores.Length; i++) _scores[i] = GC.AllocateUninitializedArray<float>(padded, pinned: true);
    }

    /// <summary>One sequence: rows 0..s−1 at positions start..start+s−1.</summary>
    public void Run(float* q, int s, int start, int heads, int kvHeads, int headDim, in KvView kv, float* output) =>
        Run(q, heads, kvHeads, headDim, [new AttentionSegment(0, s, start, kv)], output);

    /// <param name="q">[T × heads·hd], RoPE already applied; T = Σ segment counts.</param>
    /// <param name="output">[T × heads·hd].</param>
    public void Run(float* q, int heads, int kvHeads, int headDim, ReadOnlySpan<AttentionSegment> segments, float* output)
    {
        if (_segments.Length < segments.Length)
        {
            _segments = new AttentionSegment[segments.Length];
            _firstChunk = new int[segments.Length + 1];
        }
        long work = 0;
        int chunks = 0;
        for (int i = 0; i < segments.Length; i++)
        {
            var g = segments[i];
            if (g.Start + g.Count > MaxContext)
                throw new ArgumentOutOfRangeException(nameof(segments), $"positions up to {g.Start + g.Count} exceed the attention scratch ({MaxContext})");
            _segments[i] = g;
            _firstChunk[i] = chunks;
            chunks += g.Count * heads;
            work += (long)g.Count * heads * (g.Start + g.Count) * headDim;
        }
        _firstChunk[segments.Length] = chunks;
        _segmentCount = segments.Length;
        _q = q; _out = output; _heads = heads; _kvHeads = kvHeads; _headDim = headDim;
        _scale = 1f / MathF.Sqrt(headDim);
        if (work < 1 << 14) { for (int c = 0; c < chunks; c++) Execute(c, 0); }
        else _pool.Run(this, chunks);
    }

    public override void Execute(int chunk, int worker)
    {
        int si = 0;
        while (_firstChunk[si + 1] <= chunk) si++;   // few segments: a linear walk is cheapest
        ref readonly var seg = ref _segments[si];
        int local = chunk - _firstChunk[si];
        int t = local / _heads, h = local % _heads;
        int row = seg.Row + t, pos = seg.Start + t, hd = _headDim;
        int kvh = h / (_heads / _kvHeads);
        var kv = seg.Kv;
        float* q = _q + ((long)row * _heads + h) * hd;
        float* o = _out + ((long)row * _heads + h) * hd;
        int keys = pos + 1, tiles = (keys + KvView.Tile - 1) / KvView.Tile;
        fixed (float* scores = _scores[worker])
        {
            // scores[j] = q·k_j / √hd, 16 keys per tile
            for (int tile = 0; tile < tiles; tile++)
                TileScores(q, kv.KeyTile(tile) + (long)kvh * hd * KvView.Tile, hd, _scale, scores + tile * KvView.Tile);
            var p = new Span<float>(scores, keys);
            TensorPrimitives.SoftMax(p, p);
            // o = Σ_j p_j · v_j
            if (SimdPolicy.Current == SimdPolicy.Isa.V512 && hd % 32 == 0) WeightedSumV512(kv, kvh * hd, hd, scores, keys, o);
            else
            {
                new Span<float>(o, hd).Clear();
                for (int tile = 0; tile < tiles; tile++)
                {
                    float* vt = kv.ValueTile(tile) + kvh * hd;
                    int rows = Math.Min(KvView.Tile, keys - tile * KvView.Tile);
                    for (int r = 0; r < rows; r++) Axpy(o, vt + (long)r * kv.KvDim, scores[tile * KvView.Tile + r], hd);
                }
            }
        }
    }

    /// <summary>16 scores from one transposed key tile [hd][16]: broadcast q[i] times row i of the tile.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TileScores(float* q, float* kt, int hd, float scale, float* dst)
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
                    a0 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i]), Vector512.Load(kt + i * 16), a0);
                    a1 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i + 1]), Vector512.Load(kt + i * 16 + 16), a1);
                    a2 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i + 2]), Vector512.Load(kt + i * 16 + 32), a2);
                    a3 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i + 3]), Vector512.Load(kt + i * 16 + 48), a3);
                }
                for (; i < hd; i++) a0 = Vector512.FusedMultiplyAdd(Vector512.Create(q[i]), Vector512.Load(kt + i * 16), a0);
                ((a0 + a1 + (a2 + a3)) * scale).Store(dst);
                break;
            }
            case SimdPolicy.Isa.V256:
            {
                Vector256<float> a0 = Vector256<float>.Zero, a1 = Vector256<float>.Zero;
                for (int i = 0; i < hd; i++)
                {
                    var b = Vector256.Create(q[i]);
                    a0 = Vector256.FusedMultiplyAdd(b, Vector256.Load(kt + i * 16), a0);
                    a1 = Vector256.FusedMultiplyAdd(b, Vector256.Load(kt + i * 16 + 8), a1);
                }
                (a0 * scale).Store(dst);
                (a1 * scale).Store(dst + 8);
                break;
            }
            default:
                for (int c = 0; c < 16; c++)
                {
                    float s = 0;
                    for (int i = 0; i < hd; i++) s = MathF.FusedMultiplyAdd(q[i], kt[i * 16 + c], s);
                    dst[c] = s * scale;
                }
                break;
        }
    }

    /// <summary>
    /// o[0..hd) = Σ_j p[j] · v_j[offset..offset+hd), hd a multiple of 32: the output stays in registers, 32 floats
    /// at a time, with keys taken two at a time into separate accumulators (four independent FMA chains).
    /// </summary>
    private static void WeightedSumV512(in KvView kv, int offset, int hd, float* p, int keys, float* o)
    {
        long stride = kv.KvDim;
        for (int c = 0; c < hd; c += 32)
        {
            Vector512<float> a0 = default, a1 = default, b0 = default, b1 = default;
            for (int tile = 0, j = 0; j < keys; tile++)
            {
                float* v = kv.ValueTile(tile) + offset + c;
                int end = Math.Min(keys, j + KvView.Tile);
                for (; j + 1 < end; j += 2, v += 2 * stride)
                {
                    var pj = Vector512.Create(p[j]);
                    var pk = Vector512.Create(p[j + 1]);
                    a0 = Vector512.FusedMultiplyAdd(Vector512.Load(v), pj, a0);
                    a1 = Vector512.FusedMultiplyAdd(Vector512.Load(v + 16), pj, a1);
                    b0 = Vector512.FusedMultiplyAdd(Vector512.Load(v + stride), pk, b0);
                    b1 = Vector512.FusedMultiplyAdd(Vector512.Load(v + stride + 16), pk, b1);
                }
                if (j < end)
                {
                    var pj = Vector512.Create(p[j]);
                    a0 = Vector512.FusedMultiplyAdd(Vector512.Load(v), pj, a0);
                    a1 = Vector512.FusedMultiplyAdd(Vector512.Load(v + 16), pj, a1);
                    j++;
                }
            }
            (a0 + b0).Store(o + c);
            (a1 + b1).Store(o + c + 16);
        }
    }

    /// <summary>o[0..n) += p · v[0..n).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Axpy(float* o, float* v, float p, int n)
    {
        int c = 0;
        if (SimdPolicy.Current == SimdPolicy.Isa.V512)
        {
            var pv = Vector512.Create(p);
            for (; c + 16 <= n; c += 16) Vector512.FusedMultiplyAdd(Vector512.Load(v + c), pv, Vector512.Load(o + c)).Store(o + c);
        }
        else if (SimdPolicy.Current == SimdPolicy.Isa.V256)
        {
            var pv = Vector256.Create(p);
            for (; c + 8 <= n; c += 8) Vector256.FusedMultiplyAdd(Vector256.Load(v + c), pv, Vector256.Load(o + c)).Store(o + c);
        }
        for (; c < n; c++) o[c] = MathF.FusedMultiplyAdd(v[c], p, o[c]);
    }
}
