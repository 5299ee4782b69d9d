using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MiniLlm.Kernels;

/// <summary>
/// Y[M×N] = X[M×K] · Wᵀ for a few rows (batched decode and short prefill chunks, 2 ≤ M &lt; <see cref="MatMul.PackedMinRows"/>), where the
/// weights must still stream from DRAM at close to GEMV speed while each byte is used M times.
/// <para>
/// A register tile holds 8 X rows × 3 W rows (24 accumulators; 11 loads per 24 FMAs), so for M ≤ 8 every weight
/// byte is read once. K is cut into blocks of at most <see cref="KBlock"/> so the tile's 8 X rows (8 × 1024 fp32 =
/// 32 KiB) stay in L1 while the weights stream past; the partial sums of a block are added into Y. Each worker
/// takes a run of W rows; while one tile computes, it prefetches the next tile's bytes at the same offsets — the
/// hardware prefetcher alone keeps too few lines in flight at this compute rate (measured: 2× the GEMV time at
/// M = 8 without, 1.2–1.4× with). Groups of 8 X rows beyond the first re-read their W slice from L2.
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

    private readonly WorkerPool _pool;
    private readonly ProductChunks _chunks = new();
    private int _kBlock;
    private float* _x;
    private float* _xPack;                          // X regrouped for the tiles (see Pack)
    private long _xPackFloats;
    private int _m, _k;
    private SimdPolicy.Isa _isa;

    public SkinnyGemm(WorkerPool pool) => _pool = pool;

    /// <summary>Every product shares X [m × k]; each writes its own Y [m × W.Rows].</summary>
    public void Run(float* x, int m, int k, ReadOnlySpan<MatMul.Product> products, SimdPolicy.Isa isa)
    {
        _x = x; _m = m; _k = k; _isa = isa;
        long packFloats = (long)(m + GroupRows - 1) / GroupRows * GroupRows * k;
        if (packFloats > _xPackFloats)
        {
            if (_xPack != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_xPack);
            _xPack = (float*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)packFloats * sizeof(float), 64);
            _xPackFloats = packFloats;
        }
        if (isa == SimdPolicy.Isa.V512) Tiles<Simd512, Vector512<float>, F32Load>.Pack(x, m, k, _xPack);
        else Tiles<Simd256, Vector256<float>, F32Load>.Pack(x, m, k, _xPack);
        int blocks = (k + KBlock - 1) / KBlock;
        _kBlock = ((k + blocks - 1) / blocks + 63) & ~63;
        long rows = 0, macs = 0, maxRowBytes = 0;
        foreach (var p in products) { rows += p.W.Rows; macs += (long)p.W.Rows * k * m; maxRowBytes = Math.Max(maxRowBytes, p.W.RowBytes); }
        // Several chunks per thread for balance, each a whole number of tiles; with several X row groups, small
        // enough that a chunk's slice of one K block is still in L2 when the next group comes round.
        long perChunk = Math.Max(TileCols, rows / (4 * _pool.Threads));
        if (m > 8) perChunk = Math.Min(perChunk, Math.Max(TileCols, ReuseBytes * k / (maxRowBytes * _kBlock)));
        int chunks = _chunks.Set(products, (int)((perChunk + TileCols - 1) / TileCols * TileCols));
        try
        {
            if (macs < MatMul.SerialMacs) for (int c = 0; c < chunks; c++) Execute(c, 0);
            else _pool.Run(this, chunks);
        }
        finally { _chunks.Clear(); }
    }

    public override void Execute(int chunk, int worker)
    {
        var p = _chunks.Find(chunk, out int local);
        int n0 = local * _chunks.RowsPerChunk, n1 = Math.Min(p.W.Rows, n0 + _chunks.RowsPerChunk);
        switch (p.W.Type)
        {
            case WeightType.F32: Rows<F32Load>(p.W, p.Y, n0, n1); break;
            case WeightType.BF16: Rows<Bf16Load>(p.W, p.Y, n0, n1); break;
            case WeightType.F16: Rows<F16Load>(p.W, p.Y, n0, n1); break;
            case WeightType.Q8: Rows<Q8Load>(p.W, p.Y, n0, n1); break;
        }
    }

    private void Rows<TL>(in WeightMatrix w, float* y, int n0, int n1) where TL : IWeightLoad
    {
        if (_isa == SimdPolicy.Isa.V512) Tiles<Simd512, Vector512<float>, TL>.Rows(_x, _xPack, _m, _k, _kBlock, w, y, n0, n1);
        else Tiles<Simd256, Vector256<float>, TL>.Rows(_x, _xPack, _m, _k, _kBlock, w, y, n0, n1);
    }

    private static class Tiles<S, TV, TL> where S : ISimd<TV> where TV : struct where TL : IWeightLoad
    {
        /// <summary>Y[·, n0..n1) for all M rows: K blocks outermost, then groups of X rows, then 3-row W tiles.</summary>
        public static void Rows(float* x, float* xPack, int M, int K, int kBlock, WeightMatrix w, float* y, int n0, int n1)
        {
            int N = w.Rows, W = S.Width;
            long rowBytes = w.RowBytes;
            int tileEnd = n0 + (n1 - n0) / TileCols * TileCols;
            for (int k0 = 0; k0 < K; k0 += kBlock)
            {
                int k1 = Math.Min(K, k0 + kBlock);
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
                        if (stride == 8) Tile8x3(xg, w0, rowBytes, k0, k1, K, yt, N, rows, x + (long)m * K, add, ahead);
                        else Tile4x3(xg, w0, rowBytes, k0, k1, K, yt, N, rows, x + (long)m * K, add, ahead);
                    }
                }
            }
            // The last one or two rows of a weight: plain dot products over the whole of K.
            for (int n = tileEnd; n < n1; n++)
                for (int m = 0; m < M; m++)
                    y[(long)m * N + n] = Dot(x + (long)m * K, w.Row(n), K);
        }

        /// <summary>
        /// 8 packed X rows (<see cref="Pack"/>: the 8 vectors of one k-step are adjacent) × W rows w0, w0+rowBytes,
        /// w0+2·rowBytes over k0..k1; the first <paramref name="rows"/> rows' sums go to (add ? Y + : Y =). Each
        /// k-step prefetches the bytes <paramref name="ahead"/> past each W row's current ones.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Tile8x3(float* xp, nint w0, long rowBytes, int k0, int k1, int K, float* y, int ldy, int rows, float* x, bool add, nint ahead)
        {
            nint w1 = w0 + (nint)rowBytes, w2 = w1 + (nint)rowBytes;
            TV c00 = S.Zero, c01 = S.Zero, c02 = S.Zero, c10 = S.Zero, c11 = S.Zero, c12 = S.Zero;
            TV c20 = S.Zero, c21 = S.Zero, c22 = S.Zero, c30 = S.Zero, c31 = S.Zero, c32 = S.Zero;
            TV c40 = S.Zero, c41 = S.Zero, c42 = S.Zero, c50 = S.Zero, c51 = S.Zero, c52 = S.Zero;
            TV c60 = S.Zero, c61 = S.Zero, c62 = S.Zero, c70 = S.Zero, c71 = S.Zero, c72 = S.Zero;
            int W = S.Width, k = k0;
            nint step = (nint)(rowBytes * W / K), pf = ahead + (nint)(rowBytes * k0 / K);
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
            Put3(y, x, k, k1, w0, w1, w2, c00, c01, c02, add);
            if (rows > 1) Put3(y + ldy, x + K, k, k1, w0, w1, w2, c10, c11, c12, add);
            if (rows > 2) Put3(y + 2 * ldy, x + 2 * K, k, k1, w0, w1, w2, c20, c21, c22, add);
            if (rows > 3) Put3(y + 3 * ldy, x + 3 * K, k, k1, w0, w1, w2, c30, c31, c32, add);
            if (rows > 4) Put3(y + 4 * ldy, x + 4 * K, k, k1, w0, w1, w2, c40, c41, c42, add);
            if (rows > 5) Put3(y + 5 * ldy, x + 5 * K, k, k1, w0, w1, w2, c50, c51, c52, add);
            if (rows > 6) Put3(y + 6 * ldy, x + 6 * K, k, k1, w0, w1, w2, c60, c61, c62, add);
            if (rows > 7) Put3(y + 7 * ldy, x + 7 * K, k, k1, w0, w1, w2, c70, c71, c72, add);
        }

        /// <summary>The same for a group of at most 4 X rows (12 accumulators), so M = 2…4 does no 8-row work.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Tile4x3(float* xp, nint w0, long rowBytes, int k0, int k1, int K, float* y, int ldy, int rows, float* x, bool add, nint ahead)
        {
            nint w1 = w0 + (nint)rowBytes, w2 = w1 + (nint)rowBytes;
            TV c00 = S.Zero, c01 = S.Zero, c02 = S.Zero, c10 = S.Zero, c11 = S.Zero, c12 = S.Zero;
            TV c20 = S.Zero, c21 = S.Zero, c22 = S.Zero, c30 = S.Zero, c31 = S.Zero, c32 = S.Zero;
            int W = S.Width, k = k0;
            nint step = (nint)(rowBytes * W / K), pf = ahead + (nint)(rowBytes * k0 / K);
            for (; k + W <= k1; k += W, xp += 4 * W, pf += step)
            {
                if (Sse.IsSupported) { Sse.Prefetch0((void*)(w0 + pf)); Sse.Prefetch0((void*)(w1 + pf)); Sse.Prefetch0((void*)(w2 + pf)); }
                TV b0 = S.LoadW<TL>(w0, k), b1 = S.LoadW<TL>(w1, k), b2 = S.LoadW<TL>(w2, k);
                TV a = S.Load(xp); c00 = S.Fma(a, b0, c00); c01 = S.Fma(a, b1, c01); c02 = S.Fma(a, b2, c02);
                a = S.Load(xp + W); c10 = S.Fma(a, b0, c10); c11 = S.Fma(a, b1, c11); c12 = S.Fma(a, b2, c12);
                a = S.Load(xp + 2 * W); c20 = S.Fma(a, b0, c20); c21 = S.Fma(a, b1, c21); c22 = S.Fma(a, b2, c22);
                a = S.Load(xp + 3 * W); c30 = S.Fma(a, b0, c30); c31 = S.Fma(a, b1, c31); c32 = S.Fma(a, b2, c32);
            }
            Put3(y, x, k, k1, w0, w1, w2, c00, c01, c02, add);
            if (rows > 1) Put3(y + ldy, x + K, k, k1, w0, w1, w2, c10, c11, c12, add);
            if (rows > 2) Put3(y + 2 * ldy, x + 2 * K, k, k1, w0, w1, w2, c20, c21, c22, add);
            if (rows > 3) Put3(y + 3 * ldy, x + 3 * K, k, k1, w0, w1, w2, c30, c31, c32, add);
        }

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

        /// <summary>One X row's three sums (+ the scalar tail k..k1 from the row itself) into y[0..2].</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Put3(float* y, float* x, int k, int k1, nint w0, nint w1, nint w2, TV c0, TV c1, TV c2, bool add)
        {
            float s0 = S.Sum(c0), s1 = S.Sum(c1), s2 = S.Sum(c2);
            for (; k < k1; k++)
            {
                float xv = x[k];
                s0 = MathF.FusedMultiplyAdd(xv, TL.Load1(w0, k), s0);
                s1 = MathF.FusedMultiplyAdd(xv, TL.Load1(w1, k), s1);
                s2 = MathF.FusedMultiplyAdd(xv, TL.Load1(w2, k), s2);
            }
            if (add) { y[0] += s0; y[1] += s1; y[2] += s2; }
            else { y[0] = s0; y[1] = s1; y[2] = s2; }
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
