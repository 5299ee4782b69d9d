using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MiniLlm.Kernels;

/// <summary>
/// Y[M×N] = X[M×K] · Wᵀ for many rows (prefill), computed as Yᵀ = W · Xᵀ so the weights are never copied.
/// Phase 1 packs X (small next to W, and shared by every weight of a group such as q/k/v) into panels of
/// NR = 2 vectors of rows, laid out [K][NR] (up to 16 rows with Vector512 and fp32 or bf16 weights: one panel of k
/// pairs, <see cref="PackPairs"/>, <see cref="MicroPairs"/> and <see cref="MicroPairsBf16"/>) (for a
/// single panel each worker packs its own copy instead, at its first chunk). Phase 2 hands each worker 32 rows of
/// one weight at a time (on two threads, each its half of every weight, 32 rows after 32: see
/// <see cref="TwoWaySplit"/>): an MR × NR
/// outer-product micro-kernel broadcasts one weight from each of MR = 8 rows (widened on the fly) against two X
/// vectors (16 accumulators, no horizontal sums). K is blocked by KC so that every panel's K slice (M × KC fp32,
/// 768 KiB at M = 512; one or two panels take blocks of up to 2048) stays in L2 while an 8-row weight slice sits in
/// L1; accumulators persist across K blocks in a per-worker tile buffer, and each finished 8 × NR tile is written
/// into Y column-wise once.
/// </summary>
internal sealed unsafe class PackedGemm : ParallelJob
{
    private const int MR = 8;               // weight rows per micro-kernel
    // K block. 384 against 256: fp32 GEMM 81–89 % of FMA peak instead of 72–81 % at M = 512 (fewer passes of the
    // accumulator tiles through memory; a panel slice of 512 × 384 fp32 = 768 KiB still fits L2); 512 was slower.
    private const int KC = 384;
    // K block for one or two panels (batched decode, M ≤ 64): up to 2048, so K ≤ 2048 is not blocked at all and the
    // 8-row weight slices run the whole row (two panels of 2048 × 32 fp32 = 512 KiB stay in L2). stories110m's
    // products at M = 32 and 64 (fp32, from DRAM, alternating, 9 rounds): 5–6 % less time than with 384; 768 and
    // 1024 between the two, 256 slower.
    private const int KCFewPanels = 2048;
    private const int RowsPerChunk = 32;    // weight rows per work item
    private const int MicroPerChunk = RowsPerChunk / MR;

    private readonly WorkerPool? _pool;     // null: serial only (RunSerial)
    private bool _serial;                   // this call runs on its caller's thread alone
    private readonly PerWorkerBuffers _xPacks;   // [ceil(M/NR)][K][NR]: shared (worker 0's) or, with OwnPack, one per worker
    // One panel (batched decode up to 32 rows): each worker packs X into its own buffer at its first chunk instead
    // of one thread packing in a dispatch of its own, whose output the other core then read across (the two vCPUs
    // share no cache). M = 32 × 1024 × 768 with the weights in cache, 2 threads: the separate packing phase took
    // 19 µs of a 176 µs call (skipped, 157 µs). stories110m decode (in-process alternation, 7 rounds × 32 steps):
    // fp32 b32 0.979 of the step time. At b64 (two panels, each worker packing both) it was neutral (1.001, 1.009).
    private bool OwnPack => _panels == 1;
    private readonly float*[] _tiles;       // per worker: [MicroPerChunk][panels][MR][NR] running sums
    private readonly float*[] _dequant;     // per worker: [MR][_kc] fp32 copy of a bf16/f16/Q8 weight slice
    private long _tileFloats;
    private long _dequantFloats;            // floats each _dequant buffer holds (MR × the largest K block so far)
    private float* _x;
    private int _ldx;                       // floats from one X row to the next (K, or more for a column block)
    private int _m, _k, _panels, _nr, _phase;
    private bool _pairs;                    // 16-row panels held as k pairs (see PackPairs)
    private int PanelK => _pairs ? (_k + 1) & ~1 : _k;   // K rounded up to whole pairs
    private int _kc;                        // this call's K block: KC, or KCFewPanels for one or two panels
    private readonly ProductChunks _chunks = new();

    public PackedGemm(WorkerPool pool) : this(pool.Threads) { _pool = pool; }

    /// <summary>An instance that only runs on its caller's thread (<see cref="RunSerial"/>), with one worker's buffers.</summary>
    public PackedGemm(int workers)
    {
        _tiles = new float*[workers];
        _dequant = new float*[workers];
        _xPacks = new PerWorkerBuffers(workers);
    }

    /// <summary>Every product shares X [m × K]; each writes its own Y.</summary>
    public void Run(float* x, int m, int k, ReadOnlySpan<MatMul.Product> products, SimdPolicy.Isa isa)
    {
        var pool = _pool ?? throw new InvalidOperationException("this PackedGemm runs serially only");
        Setup(x, k, m, k, products, isa);
        _serial = false;
        _splitPlan = MatMul.SplitPacked && pool.Threads == 2;
        double first = 0;
        int chunks = _splitPlan ? _chunks.SetSplit(products, _split.Share, SplitAlign, out first) : _chunks.Set(products, RowsPerChunk);

        _phase = 0;
        if (!OwnPack) pool.Run(this, _panels);
        _phase = isa == SimdPolicy.Isa.V512 ? 1 : 2;
        if (_splitPlan) _split.Run(pool, this, chunks, first);
        else pool.Run(this, chunks);
    }

    /// <summary>
    /// The products on the calling thread with worker 0's buffers: X [m × K] with rows <paramref name="ldx"/> floats
    /// apart (a column block of a wider matrix), weights possibly blocks of larger ones, Y at each product's Ldy.
    /// </summary>
    public void RunSerial(float* x, int ldx, int m, int k, ReadOnlySpan<MatMul.Product> products, SimdPolicy.Isa isa)
    {
        Setup(x, ldx, m, k, products, isa);
        _serial = true;
        _splitPlan = false;
        int chunks = _chunks.Set(products, RowsPerChunk);
        _phase = 0;
        if (!OwnPack) for (int p = 0; p < _panels; p++) PackX(p, _xPacks[0]);
        _phase = isa == SimdPolicy.Isa.V512 ? 1 : 2;
        for (int c = 0; c < chunks; c++) Execute(c, 0);
    }

    private void Setup(float* x, int ldx, int m, int k, ReadOnlySpan<MatMul.Product> products, SimdPolicy.Isa isa)
    {
        _x = x; _ldx = ldx; _m = m; _k = k;
        _nr = PanelRows(m, products, isa);
        _panels = (m + _nr - 1) / _nr;
        _pairs = _nr == 16 && isa == SimdPolicy.Isa.V512;
        _kc = Math.Min(k, _panels <= 2 ? KCFewPanels : KC);
        PerWorkerBuffers.Grow(_dequant, ref _dequantFloats, (long)MR * _kc);
        PerWorkerBuffers.Grow(_tiles, ref _tileFloats, (long)MicroPerChunk * _panels * MR * _nr);
        _xPacks.NewCall((long)_panels * _nr * PanelK);
    }

    /// <summary>
    /// X rows per panel: two vectors, or with Vector512 16 rows (held as k pairs, two vectors a pair) for fp32 and
    /// bf16 weights up to 16 rows (<see cref="MatMul.PackedNarrow"/>); f16 and Q8 keep two vectors, their widened
    /// slices going to <see cref="Micro{S,TV}"/>.
    /// </summary>
    public static int PanelRows(int m, ReadOnlySpan<MatMul.Product> products, SimdPolicy.Isa isa)
    {
        if (isa != SimdPolicy.Isa.V512) return 16;
        if (m > 16) return 32;
        foreach (var p in products) if (p.W.Type is not (WeightType.F32 or WeightType.BF16)) return 32;
        return 16;
    }

    // Two threads: each product cut once between them (TwoWaySplit) at a multiple of SplitAlign rows, each half run
    // chunk after chunk (so the chunk a worker takes next is the adjacent one, and no chunk index crosses cores).
    private const int SplitAlign = 64;
    private bool _splitPlan;
    private readonly TwoWaySplit _split = new();

    /// <summary>Worker 0's share of the rows of the next split call (<see cref="MatMul.SplitPacked"/>).</summary>
    public double SplitShare { get => _split.Share; set => _split.Share = value; }

    public override void Execute(int chunk, int worker)
    {
        if (_phase == 0) { PackX(chunk, _xPacks[0]); return; }
        if (OwnPack && _xPacks.FirstUse(worker))
            for (int p = 0; p < _panels; p++) PackX(p, _xPacks[worker]);
        if (!_splitPlan)
        {
            ref readonly var prod = ref _chunks.Find(chunk, out int local);
            Rows(prod, local, worker);
            return;
        }
        ref readonly var half = ref _chunks.Guided(chunk, out int r0, out int r1);
        for (int c = r0 / RowsPerChunk; c * RowsPerChunk < r1; c++) Rows(half, c, worker);
        _split.ChunkDone(worker);
    }

    private void Rows(in MatMul.Product prod, int local, int worker)
    {
        switch (prod.W.Type)
        {
            case WeightType.F32: Rows<F32Load>(prod, local, worker); break;
            case WeightType.BF16: Rows<Bf16Load>(prod, local, worker); break;
            case WeightType.F16: Rows<F16Load>(prod, local, worker); break;
            case WeightType.Q8: Rows<Q8Load>(prod, local, worker); break;
        }
    }

    /// <summary>Panel p: X rows p·NR … p·NR+NR−1 → [K][NR], zero past M. Written sequentially, read row by row.</summary>
    private void PackX(int p, float* xPack)
    {
        if (_pairs) { PackPairs(xPack); return; }
        int K = _k, nr = _nr, ld = _ldx;
        float* dst = xPack + (long)p * K * nr;
        int rows = Math.Min(nr, _m - p * nr);
        float* src = _x + (long)p * nr * ld;
        if (nr % 16 == 0 && Avx512F.IsSupported)
        {
            // 16 × 16 blocks transposed in registers (Transpose.Block16): the 8-wide gathers below cost ~25 cycles each.
            // A group of 16 rows past M is zeros; one partly past M is copied into a zeroed 16 × 16 tile first. Panels
            // short of M (29 or 31 rows of 32, 15 of 16, a prefill's last panel) used to take the scalar copy at the
            // end, element by element down the rows: in-process alternation, tiny-kjv 29- and 31-token prefill 0.927,
            // 0.925, 0.932 of the time; stories110m-f32 29-token prefill 0.926, decode b15 0.969, b31 0.952.
            float* tile = stackalloc float[16 * 16];
            int k = 0;
            for (; k + 16 <= K; k += 16, dst += 16 * nr)
                for (int g = 0; g < nr; g += 16)
                {
                    int valid = Math.Clamp(rows - g, 0, 16);
                    float* s = src + (long)g * ld + k;
                    if (valid == 16) { Transpose.Block16(s, s + 8L * ld, ld, dst + g, nr); continue; }
                    for (int j = 0; j < 16; j++) (j < valid ? Vector512.Load(s + (long)j * ld) : Vector512<float>.Zero).Store(tile + 16 * j);
                    Transpose.Block16(tile, tile + 8 * 16, 16, dst + g, nr);
                }
            for (; k < K; k++, dst += nr)
                for (int j = 0; j < nr; j++) dst[j] = j < rows ? src[(long)j * ld + k] : 0;
            return;
        }
        if (rows == nr && nr % 8 == 0 && Avx2.IsSupported && (long)ld * 8 < int.MaxValue)
        {
            // Column k of the panel's rows as 8-wide gathers (stride K): the scalar copy below spent 10–15 % of a
            // 512 × 768 × 768 GEMM's time here (kernel bench with packing skipped: 71–74 → 77–85 % of FMA peak).
            var rowStarts = Vector256.Create(0, ld, 2 * ld, 3 * ld, 4 * ld, 5 * ld, 6 * ld, 7 * ld);
            for (int k = 0; k < K; k++, dst += nr)
                for (int g = 0; g < nr; g += 8)
                    Avx2.GatherVector256(src + (long)g * ld + k, rowStarts, 4).Store(dst + g);
            return;
        }
        for (int k = 0; k < K; k++, dst += nr)
        {
            float* s = src + k;
            int j = 0;
            for (; j < rows; j++, s += ld) dst[j] = *s;
            for (; j < nr; j++) dst[j] = 0;
        }
    }

    private void Rows<TL>(in MatMul.Product prod, int chunk, int worker) where TL : IWeightLoad
    {
        if (_phase == 1) Rows<Simd512, Vector512<float>, TL>(prod, chunk, worker);
        else Rows<Simd256, Vector256<float>, TL>(prod, chunk, worker);
    }

    private void Rows<S, TV, TL>(in MatMul.Product prod, int chunk, int worker) where S : ISimd<TV> where TV : struct where TL : IWeightLoad
    {
        var w = prod.W;
        int K = _k, N = w.Rows, ldy = prod.Ldy, nr = _nr, tileFloats = MR * nr;
        int r0 = chunk * RowsPerChunk, r1 = Math.Min(N, r0 + RowsPerChunk);
        float* tiles = _tiles[worker];
        float* xPack = _xPacks[OwnPack ? worker : 0];
        int kcMax = _kc;
        for (int k0 = 0; k0 < K; k0 += kcMax)
        {
            int kc = Math.Min(kcMax, K - k0);
            for (int n = r0, mp = 0; n < r1; n += MR, mp++)
            {
                int valid = Math.Min(MR, r1 - n);
                // While the first panel streams this 8-row slice in, ask for the next one: the next 8 rows at k0, or
                // after the chunk's last group the first group's next K block. Few panels (batched decode, M = 32–64)
                // read each slice from DRAM once with little arithmetic to hide it behind: fp32 M = 32 63 → 71–73 %
                // of FMA peak, M = 64 71–72 → 77 % (768 × 2048, interleaved); prefill (M = 512) unchanged.
                nint ahead = n + MR < r1 ? (nint)(MR * w.RowBytes) : k0 + kc < K ? (nint)((r0 - n) * w.RowBytes + w.BytesOf(kc)) : 0;
                // The chunk's very last slice asks for the first slice of the chunk this worker most likely takes next:
                // the pool hands chunks out in order, so with T workers finishing in turn that is T chunks on. Without
                // it every chunk's first 8 rows (a quarter of its bytes) came from DRAM unrequested; stories110m's
                // products at M = 32 took 4–5 % less time with it, at M = 64 2–3 % (fp32, alternating, 7–9 rounds).
                // Asking for the next chunk instead (usually the other worker's) was 3 % slower.
                if (ahead == 0)
                {
                    int next = _splitPlan || _serial ? r1 : r1 + (_pool!.Threads - 1) * RowsPerChunk;   // a split half: the adjacent chunk
                    if (next + MR <= N) ahead = (nint)((next - n) * w.RowBytes - w.BytesOf(k0));
                }
                float* tile = tiles + (long)mp * _panels * tileFloats;
                if (typeof(TL) == typeof(Bf16Load) && _phase == 1)
                {
                    nint b0 = Row(w, n, 0, valid, k0), b1 = Row(w, n, 1, valid, k0), b2 = Row(w, n, 2, valid, k0), b3 = Row(w, n, 3, valid, k0);
                    nint b4 = Row(w, n, 4, valid, k0), b5 = Row(w, n, 5, valid, k0), b6 = Row(w, n, 6, valid, k0), b7 = Row(w, n, 7, valid, k0);
                    for (int p = 0; p < _panels; p++, tile += tileFloats)
                        if (nr == 32) MicroBf16(b0, b1, b2, b3, b4, b5, b6, b7, xPack + ((long)p * K + k0) * nr, kc, tile, k0 > 0, p == 0 ? ahead : 0);
                        else MicroPairsBf16(b0, b1, b2, b3, b4, b5, b6, b7, xPack + (long)k0 * nr, kc, tile, k0 > 0, ahead);
                    continue;
                }
                if (typeof(TL) != typeof(F32Load))
                {
                    // f16, Q8 (and bf16 without Vector512): widen the 8 × kc slice to fp32 once (vector loads), so the
                    // micro-kernel's broadcasts are plain fp32 loads instead of a load, shift and broadcast per weight and panel.
                    float* dq = _dequant[worker];
                    for (int i = 0; i < MR; i++)
                    {
                        nint row = w.Row(n + Math.Min(i, valid - 1));
                        nint pf = row + (nint)w.BytesOf(k0) + ahead;
                        if (ahead != 0 && Sse.IsSupported)
                            for (long b = 0, bytes = w.BytesOf(kc); b < bytes; b += 64) Sse.Prefetch0((void*)(pf + (nint)b));
                        int k = 0, W = S.Width;
                        for (; k + W <= kc; k += W) S.Store(S.LoadW<TL>(row, k0 + k), dq + i * kcMax + k);
                        for (; k < kc; k++) dq[i * kcMax + k] = TL.Load1(row, k0 + k);
                    }
                    for (int p = 0; p < _panels; p++, tile += tileFloats)
                        Micro<S, TV>((nint)dq, (nint)(dq + kcMax), (nint)(dq + 2 * kcMax), (nint)(dq + 3 * kcMax), (nint)(dq + 4 * kcMax),
                            (nint)(dq + 5 * kcMax), (nint)(dq + 6 * kcMax), (nint)(dq + 7 * kcMax), xPack + ((long)p * K + k0) * nr, kc, tile, k0 > 0, 0);
                    continue;
                }
                nint w0 = Row(w, n, 0, valid, k0), w1 = Row(w, n, 1, valid, k0), w2 = Row(w, n, 2, valid, k0), w3 = Row(w, n, 3, valid, k0);
                nint w4 = Row(w, n, 4, valid, k0), w5 = Row(w, n, 5, valid, k0), w6 = Row(w, n, 6, valid, k0), w7 = Row(w, n, 7, valid, k0);
                for (int p = 0; p < _panels; p++, tile += tileFloats)
                    if (_pairs) MicroPairs(w0, w1, w2, w3, w4, w5, w6, w7, xPack + (long)k0 * nr, kc, tile, k0 > 0, ahead);
                    else Micro<S, TV>(w0, w1, w2, w3, w4, w5, w6, w7, xPack + ((long)p * K + k0) * nr, kc, tile, k0 > 0, p == 0 ? ahead : 0);
            }
        }
        // Y[p·nr + j, n + i] = tile[i, j]
        int mp0 = 0;
        if (nr % 16 == 0 && Avx512F.IsSupported)
        {
            // Two full 8-row tiles side by side are 16 columns of Y: transposed 16 × 16 in registers and stored a row at a
            // time. For 16-row tiles too: against the gathers below, stories110m-f32 b16 0.974 and 0.985 of the step time.
            float* t = stackalloc float[16 * 16];
            for (int n = r0; n + 2 * MR <= r1; n += 2 * MR, mp0 += 2)
            {
                float* a = tiles + (long)mp0 * _panels * tileFloats, b = a + (long)_panels * tileFloats;
                for (int p = 0; p < _panels; p++, a += tileFloats, b += tileFloats)
                {
                    int cols = Math.Min(nr, _m - p * nr);
                    for (int j0 = 0; j0 < cols; j0 += 16)
                    {
                        Transpose.Block16(a + j0, b + j0, nr, t, 16);
                        float* y = prod.Y + (long)(p * nr + j0) * ldy + n;
                        for (int j = 0; j < Math.Min(16, cols - j0); j++, y += ldy) Vector512.Load(t + 16 * j).Store(y);
                    }
                }
            }
        }
        for (int n = r0 + mp0 * MR, mp = mp0; n < r1; n += MR, mp++)
        {
            int valid = Math.Min(MR, r1 - n);
            float* tile = tiles + (long)mp * _panels * tileFloats;
            for (int p = 0; p < _panels; p++, tile += tileFloats)
            {
                float* y = prod.Y + (long)p * nr * ldy + n;
                int cols = Math.Min(nr, _m - p * nr);   // valid X rows in this panel
                if (valid == MR && MR == 8 && Avx2.IsSupported)
                {
                    // Column j of the 8 × nr tile is 8 contiguous floats of Y's row: one gather and one store
                    // (scalar, this write-out took ~8 % of a 512 × 768 × 768 GEMM).
                    var tileRows = Vector256.Create(0, nr, 2 * nr, 3 * nr, 4 * nr, 5 * nr, 6 * nr, 7 * nr);
                    for (int j = 0; j < cols; j++, y += ldy) Avx2.GatherVector256(tile + j, tileRows, 4).Store(y);
                    continue;
                }
                for (int j = 0; j < cols; j++, y += ldy)
                    for (int i = 0; i < valid; i++) y[i] = tile[i * nr + j];
            }
        }
    }

    /// <summary>Row n+i of W from column k0; rows past the valid ones repeat the last (their results are dropped).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static nint Row(in WeightMatrix w, int n, int i, int valid, int k0) =>
        w.Row(n + Math.Min(i, valid - 1)) + (nint)k0 * w.ElementSize;

    /// <summary>
    /// tile[MR × 2W] (+)= 8 fp32 weight rows (from k0; other types arrive widened) · X panel slice [kc][2W]; with
    /// <paramref name="ahead"/> ≠ 0, each row's line at +ahead is requested every 16 weights.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Micro<S, TV>(nint w0, nint w1, nint w2, nint w3, nint w4, nint w5, nint w6, nint w7, float* x, int kc, float* tile, bool accumulate, nint ahead)
        where S : ISimd<TV> where TV : struct
    {
        int W = S.Width, nr = 2 * W;
        TV c00 = S.Zero, c01 = S.Zero, c10 = S.Zero, c11 = S.Zero, c20 = S.Zero, c21 = S.Zero, c30 = S.Zero, c31 = S.Zero;
        TV c40 = S.Zero, c41 = S.Zero, c50 = S.Zero, c51 = S.Zero, c60 = S.Zero, c61 = S.Zero, c70 = S.Zero, c71 = S.Zero;
        if (accumulate)
        {
            float* t = tile;
            c00 = S.Load(t); c01 = S.Load(t + W); t += nr; c10 = S.Load(t); c11 = S.Load(t + W); t += nr;
            c20 = S.Load(t); c21 = S.Load(t + W); t += nr; c30 = S.Load(t); c31 = S.Load(t + W); t += nr;
            c40 = S.Load(t); c41 = S.Load(t + W); t += nr; c50 = S.Load(t); c51 = S.Load(t + W); t += nr;
            c60 = S.Load(t); c61 = S.Load(t + W); t += nr; c70 = S.Load(t); c71 = S.Load(t + W);
        }
        for (int k = 0; k < kc; k++, x += nr)
        {
            if (ahead != 0 && (k & 15) == 0 && Sse.IsSupported)
            {
                Sse.Prefetch0((void*)(w0 + ahead)); Sse.Prefetch0((void*)(w1 + ahead)); Sse.Prefetch0((void*)(w2 + ahead)); Sse.Prefetch0((void*)(w3 + ahead));
                Sse.Prefetch0((void*)(w4 + ahead)); Sse.Prefetch0((void*)(w5 + ahead)); Sse.Prefetch0((void*)(w6 + ahead)); Sse.Prefetch0((void*)(w7 + ahead));
                ahead += 16 * sizeof(float);
            }
            TV b0 = S.Load(x), b1 = S.Load(x + W);
            TV a = S.BroadcastW<F32Load>(w0, k); c00 = S.Fma(a, b0, c00); c01 = S.Fma(a, b1, c01);
            a = S.BroadcastW<F32Load>(w1, k); c10 = S.Fma(a, b0, c10); c11 = S.Fma(a, b1, c11);
            a = S.BroadcastW<F32Load>(w2, k); c20 = S.Fma(a, b0, c20); c21 = S.Fma(a, b1, c21);
            a = S.BroadcastW<F32Load>(w3, k); c30 = S.Fma(a, b0, c30); c31 = S.Fma(a, b1, c31);
            a = S.BroadcastW<F32Load>(w4, k); c40 = S.Fma(a, b0, c40); c41 = S.Fma(a, b1, c41);
            a = S.BroadcastW<F32Load>(w5, k); c50 = S.Fma(a, b0, c50); c51 = S.Fma(a, b1, c51);
            a = S.BroadcastW<F32Load>(w6, k); c60 = S.Fma(a, b0, c60); c61 = S.Fma(a, b1, c61);
            a = S.BroadcastW<F32Load>(w7, k); c70 = S.Fma(a, b0, c70); c71 = S.Fma(a, b1, c71);
        }
        S.Store(c00, tile); S.Store(c01, tile + W); tile += nr;
        S.Store(c10, tile); S.Store(c11, tile + W); tile += nr;
        S.Store(c20, tile); S.Store(c21, tile + W); tile += nr;
        S.Store(c30, tile); S.Store(c31, tile + W); tile += nr;
        S.Store(c40, tile); S.Store(c41, tile + W); tile += nr;
        S.Store(c50, tile); S.Store(c51, tile + W); tile += nr;
        S.Store(c60, tile); S.Store(c61, tile + W); tile += nr;
        S.Store(c70, tile); S.Store(c71, tile + W);
    }

    /// <summary>
    /// The one panel of up to 16 rows (fp32 or bf16 weights, Vector512) as k pairs: [ceil(K/2)][32], pair kp holding
    /// X[i, 2kp] and X[i, 2kp+1] side by side for rows 0–7 (lanes 0–15), then rows 8–15 (lanes 16–31); zero past
    /// M and past K. Each 16 × 16 block is transposed in registers, then its k columns interleaved two by two.
    /// </summary>
    private void PackPairs(float* dst)
    {
        int K = _k, ld = _ldx, rows = Math.Min(16, _m);
        float* tile = stackalloc float[16 * 16];
        float* t = stackalloc float[16 * 16];
        var lo = Vector512.Create(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        var hi = Vector512.Create(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        int k = 0;
        for (; k + 16 <= K; k += 16, dst += 16 * 16)
        {
            float* s = _x + k;
            if (rows == 16) Transpose.Block16(s, s + 8L * ld, ld, t, 16);
            else
            {
                for (int j = 0; j < 16; j++) (j < rows ? Vector512.Load(s + (long)j * ld) : Vector512<float>.Zero).Store(tile + 16 * j);
                Transpose.Block16(tile, tile + 8 * 16, 16, t, 16);
            }
            for (int j = 0; j < 16; j += 2)
            {
                var even = Vector512.Load(t + 16 * j);
                var odd = Vector512.Load(t + 16 * (j + 1));
                Avx512F.PermuteVar16x32x2(even, lo, odd).Store(dst + 16 * j);
                Avx512F.PermuteVar16x32x2(even, hi, odd).Store(dst + 16 * j + 16);
            }
        }
        for (int kk = k; kk < PanelK; kk++)
            for (int i = 0; i < 16; i++)
                dst[(kk - k) / 2 * 32 + i / 8 * 16 + i % 8 * 2 + (kk - k) % 2] = i < rows && kk < K ? _x[(long)i * ld + kk] : 0;
    }

    /// <summary>
    /// tile[8 × 16] (+)= 8 fp32 weight rows (from k0) · a pair panel's slice (<see cref="PackPairs"/>): per k pair,
    /// each row's two weights are broadcast as one 64-bit load against both halves of the pair (rows 0–7 and 8–15),
    /// so 10 loads feed 16 FMAs into 16 accumulators, as in <see cref="Micro{S,TV}"/>. Even and odd k are summed in
    /// separate lanes and added at the end. The kernel it replaced broadcast one weight against one vector of 16 rows
    /// (9 loads for 8 FMAs, 8 accumulators): stories110m's products at M = 16 took 0.90–0.94 of its time (weights in
    /// L2 or from DRAM), the b16 decode step 0.957 and 0.947 (in-process alternation, both orders, 15 rounds each).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void MicroPairs(nint w0, nint w1, nint w2, nint w3, nint w4, nint w5, nint w6, nint w7, float* x, int kc, float* tile, bool accumulate, nint ahead)
    {
        var z = Vector512<float>.Zero;
        Vector512<float> a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z, a3 = z, b3 = z, a4 = z, b4 = z, a5 = z, b5 = z, a6 = z, b6 = z, a7 = z, b7 = z;
        int k = 0;
        for (; k + 2 <= kc; k += 2, x += 32)
        {
            if (ahead != 0 && (k & 15) == 0)
            {
                Sse.Prefetch0((void*)(w0 + ahead)); Sse.Prefetch0((void*)(w1 + ahead)); Sse.Prefetch0((void*)(w2 + ahead)); Sse.Prefetch0((void*)(w3 + ahead));
                Sse.Prefetch0((void*)(w4 + ahead)); Sse.Prefetch0((void*)(w5 + ahead)); Sse.Prefetch0((void*)(w6 + ahead)); Sse.Prefetch0((void*)(w7 + ahead));
                ahead += 16 * sizeof(float);
            }
            var lo = Vector512.Load(x); var hi = Vector512.Load(x + 16);
            var w = Pair(w0, k); a0 = Avx512F.FusedMultiplyAdd(w, lo, a0); b0 = Avx512F.FusedMultiplyAdd(w, hi, b0);
            w = Pair(w1, k); a1 = Avx512F.FusedMultiplyAdd(w, lo, a1); b1 = Avx512F.FusedMultiplyAdd(w, hi, b1);
            w = Pair(w2, k); a2 = Avx512F.FusedMultiplyAdd(w, lo, a2); b2 = Avx512F.FusedMultiplyAdd(w, hi, b2);
            w = Pair(w3, k); a3 = Avx512F.FusedMultiplyAdd(w, lo, a3); b3 = Avx512F.FusedMultiplyAdd(w, hi, b3);
            w = Pair(w4, k); a4 = Avx512F.FusedMultiplyAdd(w, lo, a4); b4 = Avx512F.FusedMultiplyAdd(w, hi, b4);
            w = Pair(w5, k); a5 = Avx512F.FusedMultiplyAdd(w, lo, a5); b5 = Avx512F.FusedMultiplyAdd(w, hi, b5);
            w = Pair(w6, k); a6 = Avx512F.FusedMultiplyAdd(w, lo, a6); b6 = Avx512F.FusedMultiplyAdd(w, hi, b6);
            w = Pair(w7, k); a7 = Avx512F.FusedMultiplyAdd(w, lo, a7); b7 = Avx512F.FusedMultiplyAdd(w, hi, b7);
        }
        if (k < kc)
        {
            // An odd K's last weight, broadcast alone: the panel's odd lanes of this pair are zero.
            var lo = Vector512.Load(x); var hi = Vector512.Load(x + 16);
            var w = One(w0, k); a0 = Avx512F.FusedMultiplyAdd(w, lo, a0); b0 = Avx512F.FusedMultiplyAdd(w, hi, b0);
            w = One(w1, k); a1 = Avx512F.FusedMultiplyAdd(w, lo, a1); b1 = Avx512F.FusedMultiplyAdd(w, hi, b1);
            w = One(w2, k); a2 = Avx512F.FusedMultiplyAdd(w, lo, a2); b2 = Avx512F.FusedMultiplyAdd(w, hi, b2);
            w = One(w3, k); a3 = Avx512F.FusedMultiplyAdd(w, lo, a3); b3 = Avx512F.FusedMultiplyAdd(w, hi, b3);
            w = One(w4, k); a4 = Avx512F.FusedMultiplyAdd(w, lo, a4); b4 = Avx512F.FusedMultiplyAdd(w, hi, b4);
            w = One(w5, k); a5 = Avx512F.FusedMultiplyAdd(w, lo, a5); b5 = Avx512F.FusedMultiplyAdd(w, hi, b5);
            w = One(w6, k); a6 = Avx512F.FusedMultiplyAdd(w, lo, a6); b6 = Avx512F.FusedMultiplyAdd(w, hi, b6);
            w = One(w7, k); a7 = Avx512F.FusedMultiplyAdd(w, lo, a7); b7 = Avx512F.FusedMultiplyAdd(w, hi, b7);
        }
        Fold(a0, b0, tile, accumulate); Fold(a1, b1, tile + 16, accumulate); Fold(a2, b2, tile + 32, accumulate); Fold(a3, b3, tile + 48, accumulate);
        Fold(a4, b4, tile + 64, accumulate); Fold(a5, b5, tile + 80, accumulate); Fold(a6, b6, tile + 96, accumulate); Fold(a7, b7, tile + 112, accumulate);
    }

    /// <summary>Weights k and k+1 of a row in every lane pair.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Pair(nint row, int k) => Vector512.Create(*(double*)(row + 4 * k)).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> One(nint row, int k) => Vector512.Create(*(float*)(row + 4 * k));

    /// <summary>bf16 weights k and k+1 of a row as one 32-bit value (k in the low half) in every lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<int> PairBf16(nint row, int k) => Vector512.Create(*(int*)(row + 2 * k));

    /// <summary>bf16 weight k of a row, widened to fp32, in every lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> OneBf16(nint row, int k) => Vector512.Create((int)*(ushort*)(row + 2 * k) << 16).AsSingle();

    /// <summary>16 sums of one weight row (rows 0–7 from <paramref name="lo"/>, 8–15 from <paramref name="hi"/>), each
    /// its even-k and odd-k lanes added, stored to (or added to) one 16-float tile row.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Fold(Vector512<float> lo, Vector512<float> hi, float* row, bool accumulate)
    {
        var even = Avx512F.PermuteVar16x32x2(lo, Vector512.Create(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), hi);
        var odd = Avx512F.PermuteVar16x32x2(lo, Vector512.Create(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), hi);
        var sum = even + odd;
        if (accumulate) sum += Vector512.Load(row);
        sum.Store(row);
    }

    /// <summary>
    /// <see cref="Micro{S,TV}"/> for bf16 weights read in place (Vector512, 32-row panels): each row's weights k and
    /// k+1 are one 32-bit broadcast, widened in registers (a shift and a mask, which need no FMA pipe) and multiplied
    /// into the panel's columns k and k+1. Against widening each 8-row slice into an fp32 buffer first: stories110m-bf16
    /// products at M = 64 0.868 of the time from DRAM (84 % of FMA peak), 0.899 from L2, M = 512 0.987; the b64 decode
    /// step 0.890 and 0.879 (1 / 1.138), a 128-token prefill 0.924 and 0.916 (in-process alternation, both orders).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void MicroBf16(nint w0, nint w1, nint w2, nint w3, nint w4, nint w5, nint w6, nint w7, float* x, int kc, float* tile, bool accumulate, nint ahead)
    {
        var z = Vector512<float>.Zero;
        Vector512<float> c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z, c60 = z, c61 = z, c70 = z, c71 = z;
        if (accumulate)
        {
            c00 = Vector512.Load(tile + 0); c01 = Vector512.Load(tile + 16);
            c10 = Vector512.Load(tile + 32); c11 = Vector512.Load(tile + 48);
            c20 = Vector512.Load(tile + 64); c21 = Vector512.Load(tile + 80);
            c30 = Vector512.Load(tile + 96); c31 = Vector512.Load(tile + 112);
            c40 = Vector512.Load(tile + 128); c41 = Vector512.Load(tile + 144);
            c50 = Vector512.Load(tile + 160); c51 = Vector512.Load(tile + 176);
            c60 = Vector512.Load(tile + 192); c61 = Vector512.Load(tile + 208);
            c70 = Vector512.Load(tile + 224); c71 = Vector512.Load(tile + 240);
        }
        var himask = Vector512.Create(unchecked((int)0xFFFF0000));
        Vector512<int> p; Vector512<float> lo, hi;
        int k = 0;
        for (; k + 2 <= kc; k += 2, x += 64)
        {
            if (ahead != 0 && (k & 31) == 0)
            {
                Sse.Prefetch0((void*)(w0 + ahead)); Sse.Prefetch0((void*)(w1 + ahead)); Sse.Prefetch0((void*)(w2 + ahead)); Sse.Prefetch0((void*)(w3 + ahead));
                Sse.Prefetch0((void*)(w4 + ahead)); Sse.Prefetch0((void*)(w5 + ahead)); Sse.Prefetch0((void*)(w6 + ahead)); Sse.Prefetch0((void*)(w7 + ahead));
                ahead += 64;
            }
            var x0 = Vector512.Load(x); var x1 = Vector512.Load(x + 16); var x2 = Vector512.Load(x + 32); var x3 = Vector512.Load(x + 48);
            p = PairBf16(w0, k); lo = (p << 16).AsSingle(); hi = (p & himask).AsSingle();
            c00 = Avx512F.FusedMultiplyAdd(lo, x0, c00); c01 = Avx512F.FusedMultiplyAdd(lo, x1, c01); c00 = Avx512F.FusedMultiplyAdd(hi, x2, c00); c01 = Avx512F.FusedMultiplyAdd(hi, x3, c01);
            p = PairBf16(w1, k); lo = (p << 16).AsSingle(); hi = (p & himask).AsSingle();
            c10 = Avx512F.FusedMultiplyAdd(lo, x0, c10); c11 = Avx512F.FusedMultiplyAdd(lo, x1, c11); c10 = Avx512F.FusedMultiplyAdd(hi, x2, c10); c11 = Avx512F.FusedMultiplyAdd(hi, x3, c11);
            p = PairBf16(w2, k); lo = (p << 16).AsSingle(); hi = (p & himask).AsSingle();
            c20 = Avx512F.FusedMultiplyAdd(lo, x0, c20); c21 = Avx512F.FusedMultiplyAdd(lo, x1, c21); c20 = Avx512F.FusedMultiplyAdd(hi, x2, c20); c21 = Avx512F.FusedMultiplyAdd(hi, x3, c21);
            p = PairBf16(w3, k); lo = (p << 16).AsSingle(); hi = (p & himask).AsSingle();
            c30 = Avx512F.FusedMultiplyAdd(lo, x0, c30); c31 = Avx512F.FusedMultiplyAdd(lo, x1, c31); c30 = Avx512F.FusedMultiplyAdd(hi, x2, c30); c31 = Avx512F.FusedMultiplyAdd(hi, x3, c31);
            p = PairBf16(w4, k); lo = (p << 16).AsSingle(); hi = (p & himask).AsSingle();
            c40 = Avx512F.FusedMultiplyAdd(lo, x0, c40); c41 = Avx512F.FusedMultiplyAdd(lo, x1, c41); c40 = Avx512F.FusedMultiplyAdd(hi, x2, c40); c41 = Avx512F.FusedMultiplyAdd(hi, x3, c41);
            p = PairBf16(w5, k); lo = (p << 16).AsSingle(); hi = (p & himask).AsSingle();
            c50 = Avx512F.FusedMultiplyAdd(lo, x0, c50); c51 = Avx512F.FusedMultiplyAdd(lo, x1, c51); c50 = Avx512F.FusedMultiplyAdd(hi, x2, c50); c51 = Avx512F.FusedMultiplyAdd(hi, x3, c51);
            p = PairBf16(w6, k); lo = (p << 16).AsSingle(); hi = (p & himask).AsSingle();
            c60 = Avx512F.FusedMultiplyAdd(lo, x0, c60); c61 = Avx512F.FusedMultiplyAdd(lo, x1, c61); c60 = Avx512F.FusedMultiplyAdd(hi, x2, c60); c61 = Avx512F.FusedMultiplyAdd(hi, x3, c61);
            p = PairBf16(w7, k); lo = (p << 16).AsSingle(); hi = (p & himask).AsSingle();
            c70 = Avx512F.FusedMultiplyAdd(lo, x0, c70); c71 = Avx512F.FusedMultiplyAdd(lo, x1, c71); c70 = Avx512F.FusedMultiplyAdd(hi, x2, c70); c71 = Avx512F.FusedMultiplyAdd(hi, x3, c71);
        }
        if (k < kc)
        {
            var x0 = Vector512.Load(x); var x1 = Vector512.Load(x + 16);
            lo = OneBf16(w0, k); c00 = Avx512F.FusedMultiplyAdd(lo, x0, c00); c01 = Avx512F.FusedMultiplyAdd(lo, x1, c01);
            lo = OneBf16(w1, k); c10 = Avx512F.FusedMultiplyAdd(lo, x0, c10); c11 = Avx512F.FusedMultiplyAdd(lo, x1, c11);
            lo = OneBf16(w2, k); c20 = Avx512F.FusedMultiplyAdd(lo, x0, c20); c21 = Avx512F.FusedMultiplyAdd(lo, x1, c21);
            lo = OneBf16(w3, k); c30 = Avx512F.FusedMultiplyAdd(lo, x0, c30); c31 = Avx512F.FusedMultiplyAdd(lo, x1, c31);
            lo = OneBf16(w4, k); c40 = Avx512F.FusedMultiplyAdd(lo, x0, c40); c41 = Avx512F.FusedMultiplyAdd(lo, x1, c41);
            lo = OneBf16(w5, k); c50 = Avx512F.FusedMultiplyAdd(lo, x0, c50); c51 = Avx512F.FusedMultiplyAdd(lo, x1, c51);
            lo = OneBf16(w6, k); c60 = Avx512F.FusedMultiplyAdd(lo, x0, c60); c61 = Avx512F.FusedMultiplyAdd(lo, x1, c61);
            lo = OneBf16(w7, k); c70 = Avx512F.FusedMultiplyAdd(lo, x0, c70); c71 = Avx512F.FusedMultiplyAdd(lo, x1, c71);
        }
        c00.Store(tile + 0); c01.Store(tile + 16);
        c10.Store(tile + 32); c11.Store(tile + 48);
        c20.Store(tile + 64); c21.Store(tile + 80);
        c30.Store(tile + 96); c31.Store(tile + 112);
        c40.Store(tile + 128); c41.Store(tile + 144);
        c50.Store(tile + 160); c51.Store(tile + 176);
        c60.Store(tile + 192); c61.Store(tile + 208);
        c70.Store(tile + 224); c71.Store(tile + 240);
    }

    /// <summary>
    /// <see cref="MicroPairs"/> for bf16 weights read in place: each row's weights k and k+1, one 32-bit broadcast, are
    /// widened into the lane pairs by one byte shuffle (w_k's bits to the top of even lanes, w_k+1's to the top of odd
    /// ones, zeros below). Against the skinny tiles (bf16 kept them at 16 rows before): stories110m-bf16 b16 decode
    /// steps 0.930 and 0.941 (1 / 1.063), a 16-token prefill 0.924 and 0.923 (in-process alternation, 15 rounds, both
    /// orders); the products alone 0.94 from DRAM but 1.12 with the weights in L2, so weights in the cache keep the tiles.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void MicroPairsBf16(nint w0, nint w1, nint w2, nint w3, nint w4, nint w5, nint w6, nint w7, float* x, int kc, float* tile, bool accumulate, nint ahead)
    {
        var z = Vector512<float>.Zero;
        Vector512<float> a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z, a3 = z, b3 = z, a4 = z, b4 = z, a5 = z, b5 = z, a6 = z, b6 = z, a7 = z, b7 = z;
        var ctrl = Vector512.Create(0x01008080, 0x03028080, 0x01008080, 0x03028080, 0x01008080, 0x03028080, 0x01008080, 0x03028080,
            0x01008080, 0x03028080, 0x01008080, 0x03028080, 0x01008080, 0x03028080, 0x01008080, 0x03028080).AsByte();
        Vector512<float> w;
        int k = 0;
        for (; k + 2 <= kc; k += 2, x += 32)
        {
            if (ahead != 0 && (k & 31) == 0)
            {
                Sse.Prefetch0((void*)(w0 + ahead)); Sse.Prefetch0((void*)(w1 + ahead)); Sse.Prefetch0((void*)(w2 + ahead)); Sse.Prefetch0((void*)(w3 + ahead));
                Sse.Prefetch0((void*)(w4 + ahead)); Sse.Prefetch0((void*)(w5 + ahead)); Sse.Prefetch0((void*)(w6 + ahead)); Sse.Prefetch0((void*)(w7 + ahead));
                ahead += 64;
            }
            var lo = Vector512.Load(x); var hi = Vector512.Load(x + 16);
            w = Avx512BW.Shuffle(PairBf16(w0, k).AsByte(), ctrl).AsSingle(); a0 = Avx512F.FusedMultiplyAdd(w, lo, a0); b0 = Avx512F.FusedMultiplyAdd(w, hi, b0);
            w = Avx512BW.Shuffle(PairBf16(w1, k).AsByte(), ctrl).AsSingle(); a1 = Avx512F.FusedMultiplyAdd(w, lo, a1); b1 = Avx512F.FusedMultiplyAdd(w, hi, b1);
            w = Avx512BW.Shuffle(PairBf16(w2, k).AsByte(), ctrl).AsSingle(); a2 = Avx512F.FusedMultiplyAdd(w, lo, a2); b2 = Avx512F.FusedMultiplyAdd(w, hi, b2);
            w = Avx512BW.Shuffle(PairBf16(w3, k).AsByte(), ctrl).AsSingle(); a3 = Avx512F.FusedMultiplyAdd(w, lo, a3); b3 = Avx512F.FusedMultiplyAdd(w, hi, b3);
            w = Avx512BW.Shuffle(PairBf16(w4, k).AsByte(), ctrl).AsSingle(); a4 = Avx512F.FusedMultiplyAdd(w, lo, a4); b4 = Avx512F.FusedMultiplyAdd(w, hi, b4);
            w = Avx512BW.Shuffle(PairBf16(w5, k).AsByte(), ctrl).AsSingle(); a5 = Avx512F.FusedMultiplyAdd(w, lo, a5); b5 = Avx512F.FusedMultiplyAdd(w, hi, b5);
            w = Avx512BW.Shuffle(PairBf16(w6, k).AsByte(), ctrl).AsSingle(); a6 = Avx512F.FusedMultiplyAdd(w, lo, a6); b6 = Avx512F.FusedMultiplyAdd(w, hi, b6);
            w = Avx512BW.Shuffle(PairBf16(w7, k).AsByte(), ctrl).AsSingle(); a7 = Avx512F.FusedMultiplyAdd(w, lo, a7); b7 = Avx512F.FusedMultiplyAdd(w, hi, b7);
        }
        if (k < kc)
        {
            var lo = Vector512.Load(x); var hi = Vector512.Load(x + 16);
            w = OneBf16(w0, k); a0 = Avx512F.FusedMultiplyAdd(w, lo, a0); b0 = Avx512F.FusedMultiplyAdd(w, hi, b0);
            w = OneBf16(w1, k); a1 = Avx512F.FusedMultiplyAdd(w, lo, a1); b1 = Avx512F.FusedMultiplyAdd(w, hi, b1);
            w = OneBf16(w2, k); a2 = Avx512F.FusedMultiplyAdd(w, lo, a2); b2 = Avx512F.FusedMultiplyAdd(w, hi, b2);
            w = OneBf16(w3, k); a3 = Avx512F.FusedMultiplyAdd(w, lo, a3); b3 = Avx512F.FusedMultiplyAdd(w, hi, b3);
            w = OneBf16(w4, k); a4 = Avx512F.FusedMultiplyAdd(w, lo, a4); b4 = Avx512F.FusedMultiplyAdd(w, hi, b4);
            w = OneBf16(w5, k); a5 = Avx512F.FusedMultiplyAdd(w, lo, a5); b5 = Avx512F.FusedMultiplyAdd(w, hi, b5);
            w = OneBf16(w6, k); a6 = Avx512F.FusedMultiplyAdd(w, lo, a6); b6 = Avx512F.FusedMultiplyAdd(w, hi, b6);
            w = OneBf16(w7, k); a7 = Avx512F.FusedMultiplyAdd(w, lo, a7); b7 = Avx512F.FusedMultiplyAdd(w, hi, b7);
        }
        Fold(a0, b0, tile + 0, accumulate);
        Fold(a1, b1, tile + 16, accumulate);
        Fold(a2, b2, tile + 32, accumulate);
        Fold(a3, b3, tile + 48, accumulate);
        Fold(a4, b4, tile + 64, accumulate);
        Fold(a5, b5, tile + 80, accumulate);
        Fold(a6, b6, tile + 96, accumulate);
        Fold(a7, b7, tile + 112, accumulate);
    }
}
