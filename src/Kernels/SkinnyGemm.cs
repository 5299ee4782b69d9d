using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MiniLlm.Kernels;

/// <summary>
/// Y[M×N] = X[M×K] · Wᵀ for a few rows (batched decode and short prefill chunks, 2 ≤ M &lt; <see cref="MatMul.PackedMinRows"/>), where the
/// weights must still stream from DRAM at close to GEMV speed while each byte is used M times.
/// <para>
/// A register tile holds 8 X rows × 3 W rows (24 accumulators; 11 loads per 24 FMAs), or 4 × 3 for M ≤ 4, so for
/// M ≤ 8 every weight byte is read once; a shuffle tree (<see cref="SumTree512"/>) finishes all its sums at once.
/// K is cut into blocks (see <see cref="Run"/>) so the tile's X rows stay in L1 or L2 while the weights stream
/// past; the partial sums of a block are added into Y. Each worker takes a run of W rows. For M ≤ 8 the tiles take
/// one row from each third of the run: three long streams, each prefetching a little ahead of itself
/// (<see cref="Tiles{S,TV,TL}.RowsStreams"/>). For M > 8, fp32 weights with K in one block do the same for each
/// group of 8 X rows in turn (<see cref="MatMul.SkinnyStreamGroups"/>); otherwise the tiles take adjacent rows and,
/// while one computes, prefetch the next tile's bytes at the same offsets — the hardware prefetcher alone keeps too
/// few lines in flight at this compute rate (2× the GEMV time at M = 8 without).
/// Groups of 8 X rows beyond the first re-read their W slice from L2.
/// </para>
/// Every weight of a group (q/k/v, gate/up) shares X and runs in one dispatch.
/// </summary>
internal sealed unsafe class SkinnyGemm : ParallelJob
{
    /// <summary>K block, in elements: a multiple of 64 so Q8 blocks and vectors never straddle it.</summary>
    public const int KBlock = 1024;
    private const int TileCols = 3;                 // W rows per register tile
    private const int GroupRows = 8;                // X rows per register tile
    private const long ReuseBytes = 256 << 10;      // for M > 8: a chunk's W slice of one K block stays in L2
    private const int StreamMaxRows = GroupRows;    // up to this many X rows: three long weight streams (see RowsStreams)
    private const int StreamKBlock = 4096;          // … with K unblocked up to here (8 × 4096 fp32 of X = 128 KiB, in L2)
    private const int StreamPrefetch = 2048;        // … each stream asking for its lines this many bytes ahead
    private const int StreamKBlock8 = 512;          // … except 5–8 rows over K > 1024: X (64 KiB at K = 2048) would not stay in L1

    private readonly WorkerPool _pool;
    private readonly ProductChunks _chunks = new();
    private int _kBlock;
    private float* _x;
    private readonly PerWorkerBuffers _xPacks;      // per worker: X regrouped for the tiles (see Pack)
    // Each worker packs its own copy of X at its first chunk (as PackedGemm does for one panel): packed once on the
    // caller before the dispatch, the other core read it across (the two vCPUs share no cache), after waiting for it.
    // stories110m decode steps (in-process alternation, 7–11 rounds × 32 steps): fp32 b8, b16, b32 0.976, 0.978,
    // 0.979 of the time; bf16 b16 0.993, b32 0.973. (A products-only harness showed 4–6 %, but its X never changed,
    // so both cores kept it cached: it measured the cross-core read of the packed copy, not of X.)
    private int _m, _k;
    private SimdPolicy.Isa _isa;

    public SkinnyGemm(WorkerPool pool)
    {
        _pool = pool;
        _xPacks = new PerWorkerBuffers(pool.Threads);
    }

    /// <summary>Every product shares X [m × k]; each writes its own Y [m × W.Rows].</summary>
    public void Run(float* x, int m, int k, ReadOnlySpan<MatMul.Product> products, SimdPolicy.Isa isa)
    {
        _x = x; _m = m; _k = k; _isa = isa;
        long packFloats = (long)(m + GroupRows - 1) / GroupRows * GroupRows * k;
        _xPacks.NewCall(packFloats);
        // K blocks: for M ≤ 8 none up to StreamKBlock (long streams; 512 for 5–8 rows past K = 1024); beyond 8 rows, 1024 (512 was 10–20 % slower
        // at K = 768).
        int kb = m <= StreamMaxRows ? (m > 4 && k > 1024 ? StreamKBlock8 : StreamKBlock) : KBlock;
        int blocks = (k + kb - 1) / kb;
        _kBlock = ((k + blocks - 1) / blocks + 63) & ~63;
        long rows = 0, macs = 0, maxRowBytes = 0;
        foreach (var p in products) { rows += p.W.Rows; macs += (long)p.W.Rows * k * m; maxRowBytes = Math.Max(maxRowBytes, p.W.RowBytes); }
        // Several chunks per thread for balance, each a whole number of tiles; with several X row groups, small
        // enough that a chunk's slice of one K block is still in L2 when the next group comes round (with the two-way
        // split below, the size of the pieces each half runs in).
        long perChunk = Math.Max(TileCols, rows / (4 * _pool.Threads));
        if (m > 8) perChunk = Math.Min(perChunk, Math.Max(TileCols, ReuseBytes * k / (maxRowBytes * _kBlock)));
        _splitPlan = (m <= StreamMaxRows || MatMul.SplitSkinnyGroups) && MatMul.SplitSkinny && _pool.Threads == 2 && macs >= MatMul.SerialMacs;
        _subRows = (int)((perChunk + TileCols - 1) / TileCols * TileCols);
        double first = 0;
        int chunks = _splitPlan ? _chunks.SetSplit(products, _split.Share, SplitAlign, out first) : _chunks.Set(products, _subRows);
        try
        {
            if (macs < MatMul.SerialMacs) for (int c = 0; c < chunks; c++) Execute(c, 0);
            else if (_splitPlan) _split.Run(_pool, this, chunks, first);
            else _pool.Run(this, chunks);
        }
        finally { _chunks.Clear(); }
    }

    // Two threads: each product cut once between them (TwoWaySplit), at a multiple of SplitAlign rows (of the 3-row
    // tiles and 16-row parked batches, so no row's sum depends on where the cut falls); over 8 rows each half runs in
    // pieces of _subRows, as the chunks were. Other thread counts take the chunks from the pool's counter.
    private const int SplitAlign = 48;
    private bool _splitPlan;
    private int _subRows;   // over 8 rows, a split half runs in pieces of this many rows (each piece's rows stay in L2 for the next group)
    private readonly TwoWaySplit _split = new();

    /// <summary>Worker 0's share of the rows of the next split call (<see cref="MatMul.SplitSkinny"/>).</summary>
    public double SplitShare { get => _split.Share; set => _split.Share = value; }

    public override void Execute(int chunk, int worker)
    {
        int n0, n1;
        ref readonly var p = ref _splitPlan ? ref _chunks.Guided(chunk, out n0, out n1) : ref ChunkRows(chunk, out n0, out n1);
        int piece = _splitPlan && _m > StreamMaxRows ? _subRows : n1 - n0;
        for (int r = n0; r < n1; r += piece)
        {
            int r1 = Math.Min(n1, r + piece);
            switch (p.W.Type)
            {
                case WeightType.F32: Rows<F32Load>(p.W, p.Y, r, r1, worker); break;
                case WeightType.BF16: Rows<Bf16Load>(p.W, p.Y, r, r1, worker); break;
                case WeightType.F16: Rows<F16Load>(p.W, p.Y, r, r1, worker); break;
                case WeightType.Q8: Rows<Q8Load>(p.W, p.Y, r, r1, worker); break;
            }
        }
        _split.ChunkDone(worker);
    }

    private ref readonly MatMul.Product ChunkRows(int chunk, out int n0, out int n1)
    {
        ref readonly var p = ref _chunks.Find(chunk, out int local);
        n0 = local * _chunks.RowsPerChunk;
        n1 = Math.Min(p.W.Rows, n0 + _chunks.RowsPerChunk);
        return ref p;
    }

    private void Rows<TL>(in WeightMatrix w, float* y, int n0, int n1, int worker) where TL : IWeightLoad
    {
        float* xPack = _xPacks[worker];
        if (_xPacks.FirstUse(worker))
        {
            if (_isa == SimdPolicy.Isa.V512) Tiles<Simd512, Vector512<float>, F32Load>.Pack(_x, _m, _k, xPack);
            else Tiles<Simd256, Vector256<float>, F32Load>.Pack(_x, _m, _k, xPack);
        }
        if (_isa == SimdPolicy.Isa.V512) Tiles<Simd512, Vector512<float>, TL>.Rows(_x, xPack, _m, _k, _kBlock, w, y, n0, n1);
        else Tiles<Simd256, Vector256<float>, TL>.Rows(_x, xPack, _m, _k, _kBlock, w, y, n0, n1);
    }

    private static class Tiles<S, TV, TL> where S : ISimd<TV> where TV : struct where TL : IWeightLoad
    {
        /// <summary>Y[·, n0..n1) for all M rows: K blocks outermost, then groups of X rows, then 3-row W tiles.</summary>
        public static void Rows(float* x, float* xPack, int M, int K, int kBlock, WeightMatrix w, float* y, int n0, int n1)
        {
            int N = w.Rows, W = S.Width;
            long rowBytes = w.RowBytes;
            if (M <= StreamMaxRows) { RowsStreams(x, xPack, M, K, kBlock, w, y, n0, n1); return; }
            if (kBlock >= K && typeof(TL) == typeof(F32Load) && MatMul.SkinnyStreamGroups)
            {
                // fp32, K in one block (≤ 1024 for M > 8): each group of 8 X rows in turn takes the chunk as M ≤ 8 does, in
                // three long streams. The first group streams the weights from DRAM as fast as batch 8 does; the
                // others find the chunk's whole rows (≤ ReuseBytes) still in L2.
                for (int m = 0; m < M; m += GroupRows)
                    RowsStreams(x + (long)m * K, xPack + (long)m * (K / W * W), Math.Min(GroupRows, M - m), K, kBlock, w, y + (long)m * N, n0, n1);
                return;
            }
            int tileEnd = n0 + (n1 - n0) / TileCols * TileCols;
            // Bytes of a W row per k-step and at k0, divided out here: two 64-bit divisions at the top of every tile
            // (about 1 k-step in 50 at K = 768) delayed its first loads and cost a quarter of the kernel's speed.
            nint step = (nint)(rowBytes * W / K);
            for (int k0 = 0; k0 < K; k0 += kBlock)
            {
                int k1 = Math.Min(K, k0 + kBlock);
                nint atK0 = (nint)(rowBytes * k0 / K);
                bool add = k0 > 0, lastBlock = k1 == K;
                for (int m = 0; m < M; m += GroupRows)
                {
                    int rows = Math.Min(GroupRows, M - m), stride = rows > 4 ? 8 : 4;
                    float* xg = xPack + (long)m * (K / W * W) + (long)(k0 / W) * stride * W;
                    for (int n = n0; n < tileEnd; n += TileCols)
                    {
                        // Only the first row group streams from DRAM; it asks for the next tile's bytes at the same
                        // offsets, or at the end of the run for the first tile of the next K block. Otherwise it
                        // "prefetches" the line it is reading (a no-op), which keeps the loop free of a branch.
                        nint ahead = 0;
                        if (m == 0)
                        {
                            if (n + TileCols < tileEnd) ahead = (nint)(TileCols * rowBytes);
                            else if (!lastBlock) ahead = (nint)((n0 - n) * rowBytes + (long)(k1 - k0) * rowBytes / K);
                        }
                        nint w0 = w.Row(n);
                        float* yt = y + (long)m * N + n;
                        nint w1 = w0 + (nint)rowBytes, w2 = w1 + (nint)rowBytes;
                        if (stride == 8) Tile8x3(xg, w0, w1, w2, k0, k1, K, yt, 1, 2, N, rows, x + (long)m * K, add, ahead + atK0, step);
                        else Tile4x3(xg, w0, w1, w2, k0, k1, K, yt, 1, 2, N, rows, x + (long)m * K, add, ahead + atK0, step);
                    }
                }
            }
            // The last one or two rows of a weight: plain dot products over the whole of K.
            for (int n = tileEnd; n < n1; n++)
                for (int m = 0; m < M; m++)
                    y[(long)m * N + n] = Dot(x + (long)m * K, w.Row(n), K);
        }

        /// <summary>
        /// Y[·, n0..n1) for M ≤ 8: the run's rows are cut in three thirds and each tile takes row t of every third, so
        /// a thread reads three long sequential weight streams (as the GEMV reads two or four) instead of three rows
        /// of a few KiB side by side; each stream prefetches <see cref="StreamPrefetch"/> bytes ahead of itself.
        /// From DRAM at stories110m shapes, interleaved: M = 2 and 4 took 0.97–1.0× the GEMV's time at K = 768 and
        /// 1.2–1.25× at K = 2048, against 1.35–1.5× for adjacent-row tiles. At M = 8: 768 × 2304 10–15 % faster than
        /// adjacent tiles with their next-tile prefetch, K = 2048 and 768 × 4096 the same; the whole batch-8 decode
        /// step 10–17 % shorter in fp32 and 4–8 % in bf16 (bench, alternating builds, 3 and 2 rounds).
        /// </summary>
        public static void RowsStreams(float* x, float* xPack, int M, int K, int kBlock, WeightMatrix w, float* y, int n0, int n1)
        {
            int N = w.Rows, W = S.Width;
            long rowBytes = w.RowBytes;
            int third = (n1 - n0) / 3;
            nint step = (nint)(rowBytes * W / K);
            // Unblocked, a stream reads each row whole and asks for its own bytes ahead. With K blocks (5–8 rows, K >
            // 1024) it reads a block-long piece of each row, so it asks for the next row's piece at the same offset
            // instead (the 8×3 tile at 2048 × 768: 2.3× the GEMV's time unblocked, 1.7–1.8× so; prefetching within
            // the row, 2.1×).
            nint ahead = kBlock < K ? (nint)rowBytes : StreamPrefetch;
            for (int k0 = 0; k0 < K; k0 += kBlock)
            {
                int k1 = Math.Min(K, k0 + kBlock);
                nint atK0 = (nint)(rowBytes * k0 / K);
                bool add = k0 > 0;
                float* xg = xPack + (long)(k0 / W) * (M > 4 ? 8 : 4) * W;   // M ≤ 8: one group of X rows
                if (typeof(TV) == typeof(Vector512<float>) && Avx512F.IsSupported && M > 4 && (long)M * N * sizeof(float) >= MatMul.SkinnyBufferedSumsMinYBytes)
                {
                    StreamTiles(x, xg, M, K, k0, k1, w, y, n0, third, add, atK0 + ahead, step);
                    continue;
                }
                for (int t = 0; t < third; t++)
                {
                    int n = n0 + t;
                    nint w0 = w.Row(n), w1 = w.Row(n + third), w2 = w.Row(n + 2 * third);
                    if (M > 4) Tile8x3(xg, w0, w1, w2, k0, k1, K, y + n, third, 2 * third, N, M, x, add, atK0 + ahead, step);
                    else Tile4x3(xg, w0, w1, w2, k0, k1, K, y + n, third, 2 * third, N, M, x, add, atK0 + ahead, step);
                }
            }
            for (int n = n0 + 3 * third; n < n1; n++)
                for (int m = 0; m < M; m++)
                    y[(long)m * N + n] = Dot(x + (long)m * K, w.Row(n), K);
        }

        /// <summary>Tiles whose sums wait in a buffer before they go to Y (see <see cref="StreamTiles"/>).</summary>
        private const int SumBatch = 16;

        /// <summary>
        /// The tiles of <see cref="RowsStreams"/> over k0..k1 (Vector512), their sums parked SumBatch tiles at a time in
        /// a small buffer and then written to Y row by row, each Y row's SumBatch values adjacent. Written from each
        /// tile instead, 24 sums go to 24 cache lines of 8 Y rows between two tiles' weight reads; when Y does not stay
        /// in L1 those stores miss and hold the miss buffers the weight streams need. Measured from DRAM, 2 threads:
        /// an 8 × 3 tile kernel over one 432 MiB matrix read 45–49 GB/s with that epilogue against 60–66 with one
        /// contiguous store (harness); SkinnyGemm itself, M = 8, 147456 × 768: 35–47 → 52–54 GB/s; stories110m's
        /// products at M = 8, alternating, 3 rounds of 30: gate/up (Y 64 KiB a product) 39–44 → 46–51 GB/s and the
        /// LM head 49–58 → 53–58, the step 4–9 % shorter; q/k/v, o and down (Y 24 KiB) the same either way, so Y
        /// below <see cref="MatMul.SkinnyBufferedSumsMinYBytes"/> keeps the direct stores. Same sums in the same order: same bits.
        /// </summary>
        private static void StreamTiles(float* x, float* xg, int M, int K, int k0, int k1, WeightMatrix w, float* y, int n0, int third, bool add, nint pf, nint step)
        {
            int N = w.Rows, W = S.Width;
            int kv = k0 + (k1 - k0) / W * W;   // columns kv..k1 (K not a multiple of the width): scalar, from X itself
            float* buf = stackalloc float[SumBatch * 32 + SumBatch * 24];
            for (int t0 = 0; t0 < third; t0 += SumBatch)
            {
                int tn = Math.Min(SumBatch, third - t0);
                for (int i = 0; i < tn; i++)
                {
                    int n = n0 + t0 + i;
                    nint w0 = w.Row(n), w1 = w.Row(n + third), w2 = w.Row(n + 2 * third);
                    if (M > 4) Tile8x3(xg, w0, w1, w2, k0, k1, K, y + n, third, 2 * third, N, M, x, add, pf, step, buf + i * 32);
                    else Tile4x3(xg, w0, w1, w2, k0, k1, K, y + n, third, 2 * third, N, M, x, add, pf, step, buf + i * 32);
                }
                if (tn == SumBatch && kv == k1)
                {
                    // The 16 tiles' sums turned around in L1 (tile-major → sum-major), so each Y row's 16 values are
                    // one vector store: gate/up read ≈ 5 % faster than with 384 scalar stores (alternating, 2 × 30).
                    float* across = buf + SumBatch * 32;
                    for (int i = 0; i < SumBatch; i++)
                        for (int sIdx = 0; sIdx < 3 * M; sIdx++) across[sIdx * SumBatch + i] = buf[i * 32 + sIdx];
                    for (int r = 0; r < M; r++)
                        for (int j = 0; j < 3; j++)
                        {
                            float* yr = y + (long)r * N + n0 + t0 + j * third;
                            var v = Vector512.Load(across + (3 * r + j) * SumBatch);
                            (add ? Vector512.Load(yr) + v : v).Store(yr);
                        }
                    continue;
                }
                // A partial batch, or columns past the vector width: each tile's rows as the tile itself would finish them.
                for (int i = 0; i < tn; i++)
                {
                    int n = n0 + t0 + i;
                    nint w0 = w.Row(n), w1 = w.Row(n + third), w2 = w.Row(n + 2 * third);
                    for (int r = 0; r < M; r++) Put3(y + (long)r * N + n, third, 2 * third, x + (long)r * K, kv, k1, w0, w1, w2, buf + i * 32, 3 * r, add);
                }
            }
        }

        /// <summary>
        /// 8 packed X rows (<see cref="Pack"/>: the 8 vectors of one k-step are adjacent) × W rows w0, w1, w2 over
        /// k0..k1; the first <paramref name="rows"/> rows' sums go to (add ? Y + : Y =) y[0], y[c1], y[c2] of each Y
        /// row. Each k-step prefetches each W row's bytes at offset <paramref name="pf"/>, which moves <paramref name="step"/> a step.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Tile8x3(float* xp, nint w0, nint w1, nint w2, int k0, int k1, int K, float* y, int c1, int c2, int ldy, int rows, float* x, bool add, nint pf, nint step, float* sumsOut = null)
        {
            TV c00 = S.Zero, c01 = S.Zero, c02 = S.Zero, c10 = S.Zero, c11 = S.Zero, c12 = S.Zero;
            TV c20 = S.Zero, c21 = S.Zero, c22 = S.Zero, c30 = S.Zero, c31 = S.Zero, c32 = S.Zero;
            TV c40 = S.Zero, c41 = S.Zero, c42 = S.Zero, c50 = S.Zero, c51 = S.Zero, c52 = S.Zero;
            TV c60 = S.Zero, c61 = S.Zero, c62 = S.Zero, c70 = S.Zero, c71 = S.Zero, c72 = S.Zero;
            int W = S.Width, k = k0;
            for (; k + W <= k1; k += W, xp += 8 * W, pf += step)
            {
                if (Sse.IsSupported) { Sse.Prefetch0((void*)(w0 + pf)); Sse.Prefetch0((void*)(w1 + pf)); Sse.Prefetch0((void*)(w2 + pf)); }
                TV b0 = S.LoadW<TL>(w0, k), b1 = S.LoadW<TL>(w1, k), b2 = S.LoadW<TL>(w2, k);
                TV a = S.Load(xp); c00 = S.Fma(a, b0, c00); c01 = S.Fma(a, b1, c01); c02 = S.Fma(a, b2, c02);
                a = S.Load(xp + W); c10 = S.Fma(a, b0, c10); c11 = S.Fma(a, b1, c11); c12 = S.Fma(a, b2, c12);
                a = S.Load(xp + 2 * W); c20 = S.Fma(a, b0, c20); c21 = S.Fma(a, b1, c21); c22 = S.Fma(a, b2, c22);
                a = S.Load(xp + 3 * W); c30 = S.Fma(a, b0, c30); c31 = S.Fma(a, b1, c31); c32 = S.Fma(a, b2, c32);
                a = S.Load(xp + 4 * W); c40 = S.Fma(a, b0, c40); c41 = S.Fma(a, b1, c41); c42 = S.Fma(a, b2, c42);
                a = S.Load(xp + 5 * W); c50 = S.Fma(a, b0, c50); c51 = S.Fma(a, b1, c51); c52 = S.Fma(a, b2, c52);
                a = S.Load(xp + 6 * W); c60 = S.Fma(a, b0, c60); c61 = S.Fma(a, b1, c61); c62 = S.Fma(a, b2, c62);
                a = S.Load(xp + 7 * W); c70 = S.Fma(a, b0, c70); c71 = S.Fma(a, b1, c71); c72 = S.Fma(a, b2, c72);
            }
            // k < k1 only in the last block when K is not a multiple of the width: those columns come from X itself.
            if (typeof(TV) == typeof(Vector512<float>) && Avx512F.IsSupported)
            {
                // No call may follow the loop: the JIT would spill accumulators inside it to save them around the call.
                float* sums = sumsOut;
                if (sums == null) { float* own = stackalloc float[32]; sums = own; }
                var z = Vector512<float>.Zero;
                SumTree512.Sums16(As(c00), As(c01), As(c02), As(c10), As(c11), As(c12), As(c20), As(c21),
                    As(c22), As(c30), As(c31), As(c32), As(c40), As(c41), As(c42), As(c50)).Store(sums);
                SumTree512.Sums16(As(c51), As(c52), As(c60), As(c61), As(c62), As(c70), As(c71), As(c72), z, z, z, z, z, z, z, z).Store(sums + 16);
                if (sumsOut != null) return;   // the caller finishes them (see StreamTiles)
                for (int r = 0; r < rows; r++) Put3(y + r * ldy, c1, c2, x + r * K, k, k1, w0, w1, w2, sums, 3 * r, add);
                return;
            }
            Put3(y, c1, c2, x, k, k1, w0, w1, w2, c00, c01, c02, add);
            if (rows > 1) Put3(y + ldy, c1, c2, x + K, k, k1, w0, w1, w2, c10, c11, c12, add);
            if (rows > 2) Put3(y + 2 * ldy, c1, c2, x + 2 * K, k, k1, w0, w1, w2, c20, c21, c22, add);
            if (rows > 3) Put3(y + 3 * ldy, c1, c2, x + 3 * K, k, k1, w0, w1, w2, c30, c31, c32, add);
            if (rows > 4) Put3(y + 4 * ldy, c1, c2, x + 4 * K, k, k1, w0, w1, w2, c40, c41, c42, add);
            if (rows > 5) Put3(y + 5 * ldy, c1, c2, x + 5 * K, k, k1, w0, w1, w2, c50, c51, c52, add);
            if (rows > 6) Put3(y + 6 * ldy, c1, c2, x + 6 * K, k, k1, w0, w1, w2, c60, c61, c62, add);
            if (rows > 7) Put3(y + 7 * ldy, c1, c2, x + 7 * K, k, k1, w0, w1, w2, c70, c71, c72, add);
        }

        /// <summary>The same for a group of at most 4 X rows (12 accumulators), so M = 2…4 does no 8-row work.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Tile4x3(float* xp, nint w0, nint w1, nint w2, int k0, int k1, int K, float* y, int c1, int c2, int ldy, int rows, float* x, bool add, nint pf, nint step, float* sumsOut = null)
        {
            TV c00 = S.Zero, c01 = S.Zero, c02 = S.Zero, c10 = S.Zero, c11 = S.Zero, c12 = S.Zero;
            TV c20 = S.Zero, c21 = S.Zero, c22 = S.Zero, c30 = S.Zero, c31 = S.Zero, c32 = S.Zero;
            int W = S.Width, k = k0;
            for (; k + W <= k1; k += W, xp += 4 * W, pf += step)
            {
                if (Sse.IsSupported) { Sse.Prefetch0((void*)(w0 + pf)); Sse.Prefetch0((void*)(w1 + pf)); Sse.Prefetch0((void*)(w2 + pf)); }
                TV b0 = S.LoadW<TL>(w0, k), b1 = S.LoadW<TL>(w1, k), b2 = S.LoadW<TL>(w2, k);
                TV a = S.Load(xp); c00 = S.Fma(a, b0, c00); c01 = S.Fma(a, b1, c01); c02 = S.Fma(a, b2, c02);
                a = S.Load(xp + W); c10 = S.Fma(a, b0, c10); c11 = S.Fma(a, b1, c11); c12 = S.Fma(a, b2, c12);
                a = S.Load(xp + 2 * W); c20 = S.Fma(a, b0, c20); c21 = S.Fma(a, b1, c21); c22 = S.Fma(a, b2, c22);
                a = S.Load(xp + 3 * W); c30 = S.Fma(a, b0, c30); c31 = S.Fma(a, b1, c31); c32 = S.Fma(a, b2, c32);
            }
            if (typeof(TV) == typeof(Vector512<float>) && Avx512F.IsSupported)
            {
                float* sums = sumsOut;
                if (sums == null) { float* own = stackalloc float[16]; sums = own; }
                var z = Vector512<float>.Zero;
                SumTree512.Sums16(As(c00), As(c01), As(c02), As(c10), As(c11), As(c12), As(c20), As(c21),
                    As(c22), As(c30), As(c31), As(c32), z, z, z, z).Store(sums);
                if (sumsOut != null) return;
                for (int r = 0; r < rows; r++) Put3(y + r * ldy, c1, c2, x + r * K, k, k1, w0, w1, w2, sums, 3 * r, add);
                return;
            }
            Put3(y, c1, c2, x, k, k1, w0, w1, w2, c00, c01, c02, add);
            if (rows > 1) Put3(y + ldy, c1, c2, x + K, k, k1, w0, w1, w2, c10, c11, c12, add);
            if (rows > 2) Put3(y + 2 * ldy, c1, c2, x + 2 * K, k, k1, w0, w1, w2, c20, c21, c22, add);
            if (rows > 3) Put3(y + 3 * ldy, c1, c2, x + 3 * K, k, k1, w0, w1, w2, c30, c31, c32, add);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Vector512<float> As(TV v) => Unsafe.BitCast<TV, Vector512<float>>(v);

        /// <summary>One X row's three sums, accumulators i..i+2 of a <see cref="SumTree512"/> store, on into <see cref="Finish3"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Put3(float* y, int c1, int c2, float* x, int k, int k1, nint w0, nint w1, nint w2, float* sums, int i, bool add) =>
            Finish3(y, c1, c2, x, k, k1, w0, w1, w2, sums[i], sums[i + 1], sums[i + 2], add);

        /// <summary>
        /// X [M × K] → per group of 8 rows (4 for a last group of at most 4), [K/W][group rows][W]: the tile's loads
        /// of one k-step are adjacent and need one pointer. Rows past M are zero (their sums are never stored).
        /// </summary>
        public static void Pack(float* x, int M, int K, float* xPack)
        {
            int W = S.Width, steps = K / W;
            for (int m = 0; m < M; m += GroupRows)
            {
                int rows = Math.Min(GroupRows, M - m), stride = rows > 4 ? 8 : 4;
                float* dst = xPack + (long)m * steps * W;
                for (int s = 0; s < steps; s++)
                    for (int i = 0; i < stride; i++, dst += W)
                    {
                        if (i < rows) S.Store(S.Load(x + (long)(m + i) * K + s * W), dst);
                        else S.Store(S.Zero, dst);
                    }
            }
        }

        /// <summary>One X row's three accumulators, summed one by one (the Vector256 path), on into <see cref="Finish3"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Put3(float* y, int c1, int c2, float* x, int k, int k1, nint w0, nint w1, nint w2, TV a0, TV a1, TV a2, bool add) =>
            Finish3(y, c1, c2, x, k, k1, w0, w1, w2, S.Sum(a0), S.Sum(a1), S.Sum(a2), add);

        /// <summary>
        /// One X row's three sums (+ the scalar tail k..k1 from the row itself) into y[0], y[c1], y[c2] (the tile's
        /// three W rows' columns), added to what is there when <paramref name="add"/> (K blocks after the first).
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Finish3(float* y, int c1, int c2, float* x, int k, int k1, nint w0, nint w1, nint w2, float s0, float s1, float s2, bool add)
        {
            for (; k < k1; k++)
            {
                float xv = x[k];
                s0 = MathF.FusedMultiplyAdd(xv, TL.Load1(w0, k), s0);
                s1 = MathF.FusedMultiplyAdd(xv, TL.Load1(w1, k), s1);
                s2 = MathF.FusedMultiplyAdd(xv, TL.Load1(w2, k), s2);
            }
            if (add) { y[0] += s0; y[c1] += s1; y[c2] += s2; }
            else { y[0] = s0; y[c1] = s1; y[c2] = s2; }
        }

        private static float Dot(float* x, nint w, int K)
        {
            TV c = S.Zero;
            int W = S.Width, k = 0;
            for (; k + W <= K; k += W) c = S.Fma(S.Load(x + k), S.LoadW<TL>(w, k), c);
            float s = S.Sum(c);
            for (; k < K; k++) s = MathF.FusedMultiplyAdd(x[k], TL.Load1(w, k), s);
            return s;
        }
    }
}

/// <summary>
/// Horizontal sums of many Vector512 accumulators at once, as a tree: pairs are folded 512→256 (two 128-bit lane
/// shuffles and an add serve two vectors), then 256→128, then within 128-bit lanes, so 16 vectors end as one vector
/// of their 16 sums in ~45 instructions instead of 16 separate reductions of ~10 each. The 8×3 skinny tile spent
/// about a fifth of its time on 24 one-by-one sums at K = 768 (one thread, weights in L2: 167 → 200 GFLOP/s).
/// </summary>
internal static class SumTree512
{
    /// <summary>a, b → [a.L0 + a.L2, a.L1 + a.L3, b.L0 + b.L2, b.L1 + b.L3] (Ln = 128-bit lane n).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Fold256(Vector512<float> a, Vector512<float> b) =>
        Avx512F.Shuffle4x128(a, b, 0b01_00_01_00) + Avx512F.Shuffle4x128(a, b, 0b11_10_11_10);

    /// <summary>Two Fold256 results (a, b), (c, d) → lanes [a, b, c, d] each folded to 128 bits.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Fold128(Vector512<float> ab, Vector512<float> cd) =>
        Avx512F.Shuffle4x128(ab, cd, 0b10_00_10_00) + Avx512F.Shuffle4x128(ab, cd, 0b11_01_11_01);

    /// <summary>Per 128-bit lane: s's 4 floats → 2 pair sums, t's → 2 pair sums.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Fold64(Vector512<float> s, Vector512<float> t) =>
        Avx512F.UnpackLow(s.AsDouble(), t.AsDouble()).AsSingle() + Avx512F.UnpackHigh(s.AsDouble(), t.AsDouble()).AsSingle();

    /// <summary>Per 128-bit lane: each adjacent pair of floats of s, then of t, added.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Fold32(Vector512<float> s, Vector512<float> t) =>
        Avx512F.Shuffle(s, t, 0b10_00_10_00) + Avx512F.Shuffle(s, t, 0b11_01_11_01);

    /// <summary>
    /// The sums of a, b, c and d as [Σa, Σb, Σc, Σd]: ~10 instructions where four <see cref="Vector512.Sum"/> calls
    /// take ~130 (.NET 10 sums each vector lane by lane in a fixed order).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Sums4(Vector512<float> a, Vector512<float> b, Vector512<float> c, Vector512<float> d)
    {
        var s = Fold128(Fold256(a, b), Fold256(c, d));           // 128-bit lane i: four partial sums of vector i
        s += Avx512F.Shuffle(s, s, 0b01_00_11_10);               // per lane: [s0+s2, s1+s3, s2+s0, s3+s1]
        s += Avx512F.Shuffle(s, s, 0b10_11_00_01);               // per lane: the lane's total in every element
        return Avx512F.PermuteVar16x32(s, Vector512.Create(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)).GetLower().GetLower();
    }

    /// <summary>The sums of v0…v15 as one vector, the sum of v_i in element i.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Sums16(Vector512<float> v0, Vector512<float> v1, Vector512<float> v2, Vector512<float> v3,
        Vector512<float> v4, Vector512<float> v5, Vector512<float> v6, Vector512<float> v7, Vector512<float> v8, Vector512<float> v9,
        Vector512<float> v10, Vector512<float> v11, Vector512<float> v12, Vector512<float> v13, Vector512<float> v14, Vector512<float> v15) =>
        // The folds leave v_i's sum in element (i mod 4)·4 + i / 4; one permute puts it back in element i.
        Avx512F.PermuteVar16x32(
            Fold32(
                Fold64(Fold128(Fold256(v0, v1), Fold256(v2, v3)), Fold128(Fold256(v4, v5), Fold256(v6, v7))),
                Fold64(Fold128(Fold256(v8, v9), Fold256(v10, v11)), Fold128(Fold256(v12, v13), Fold256(v14, v15)))),
            Vector512.Create(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
}
