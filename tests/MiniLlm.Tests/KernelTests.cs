using System.Runtime.InteropServices;
using MiniLlm.Kernels;

namespace MiniLlm.Tests;

/// <summary>Every kernel against a naive double-precision reference on random inputs of awkward sizes.</summary>
[Collection(SimdPolicyCollection.Name)]
public unsafe class KernelTests
{
    private static float[] Random(int n, int seed, float scale = 1f)
    {
        var r = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = scale * (float)(r.NextDouble() * 2 - 1);
        return a;
    }

    private static byte[] Store(float[] w, WeightType t, out float[] stored)
    {
        string dt = t switch { WeightType.F32 => "F32", WeightType.BF16 => "BF16", _ => "F16" };
        stored = w.Select(v => TestSafetensors.RoundTo(v, dt)).ToArray();
        return TestSafetensors.Typed("w", [w.Length], w, dt).Data;
    }

    /// <summary>
    /// One thread's share of a GEMV (<see cref="MatMul.GemvSlice"/>): rows cut anywhere (16-row tiles, row pairs, an
    /// odd row), columns cut on multiples of 32, fp32 and bf16, against a naive sum over the same slice.
    /// </summary>
    [Theory]
    [InlineData(37, 96, 0, 37, 0, 96)]
    [InlineData(37, 96, 5, 22, 32, 64)]
    [InlineData(37, 96, 16, 37, 64, 96)]
    [InlineData(200, 384, 0, 200, 128, 384)]
    [InlineData(3, 32, 1, 2, 0, 32)]
    public void GemvSliceMatchesNaive(int N, int K, int n0, int n1, int c0, int c1)
    {
        var x = Random(K, K * 7 + c0);
        foreach (var type in new[] { WeightType.F32, WeightType.BF16 })
        {
            var bytes = Store(Random(N * K, N + K), type, out var w);
            var y = new float[N];
            Array.Fill(y, float.NaN);   // rows outside the slice stay untouched
            var pairs = new float[c1 - c0];
            fixed (float* xp = x, yp = y, pp = pairs)
            fixed (byte* wp = bytes)
                MatMul.GemvSlice(xp, new WeightMatrix((nint)wp, type, N, K), n0, n1, c0, c1, yp, pp);
            for (int n = 0; n < N; n++)
            {
                if (n < n0 || n >= n1) { Assert.True(float.IsNaN(y[n]), $"{type} row {n} outside {n0}..{n1} was written"); continue; }
                double s = 0, a = 0;
                for (int k = c0; k < c1; k++) { s += (double)x[k] * w[n * K + k]; a += Math.Abs((double)x[k] * w[n * K + k]); }
                Assert.True(Math.Abs(y[n] - s) <= 1e-5 * a + 1e-6, $"{type} row {n} columns {c0}..{c1}: {y[n]} vs {s}");
            }
        }
    }

    /// <summary>
    /// One thread's GEMM over a block of a weight matrix (<see cref="SliceGemm"/>): rows and columns cut anywhere
    /// (odd K, K past one block of 2048), X a column block of a wider matrix (rows ldx apart), Y written at an offset
    /// into rows ldy apart, fp32 and bf16; M of one 16-row pair panel (1, 13, 16), one or two 32-row panels (17, 29,
    /// 33, 64) and more (70), and two products sharing X. Y outside the block stays untouched.
    /// </summary>
    [Theory]
    [InlineData(1, 40, 100, 3, 37, 5, 68)]
    [InlineData(13, 40, 100, 0, 40, 0, 100)]
    [InlineData(16, 64, 96, 32, 64, 32, 96)]
    [InlineData(17, 33, 57, 1, 30, 7, 50)]
    [InlineData(29, 96, 256, 16, 80, 128, 256)]
    [InlineData(33, 24, 2100, 0, 24, 0, 2100)]
    [InlineData(64, 48, 130, 8, 47, 2, 129)]
    [InlineData(70, 20, 64, 0, 19, 0, 64)]
    public void SliceGemmMatchesNaive(int M, int N, int K, int n0, int n1, int c0, int c1)
    {
        int ldx = K + 5, ldy = N + 3, n = n1 - n0, kc = c1 - c0;
        var x = Random(M * ldx, M + K);
        foreach (var type in new[] { WeightType.F32, WeightType.BF16 })
        {
            var bytesA = Store(Random(N * K, N * 3 + K), type, out var wa);
            var bytesB = Store(Random(N * K, N * 5 + K), type, out var wb);
            var ya = new float[M * ldy];
            var yb = new float[M * ldy];
            Array.Fill(ya, float.NaN);
            Array.Fill(yb, float.NaN);
            fixed (float* xp = x, yap = ya, ybp = yb)
            fixed (byte* ap = bytesA, bp = bytesB)
            {
                var A = new WeightMatrix((nint)ap, type, N, K).Block(n0, n1, c0, c1);
                var B = new WeightMatrix((nint)bp, type, N, K).Block(n0, n1, c0, c1);
                Assert.Equal((n, kc), (A.Rows, A.Cols));
                new SliceGemm().Run(xp + c0, ldx, M, [new(A, yap + n0, ldy), new(B, ybp + n0, ldy)]);
            }
            foreach (var (w, y, name) in new[] { (wa, ya, "A"), (wb, yb, "B") })
                for (int i = 0; i < M; i++)
                    for (int j = 0; j < ldy; j++)
                    {
                        if (j < n0 || j >= n1) { Assert.True(float.IsNaN(y[i * ldy + j]), $"{type} {name} Y[{i},{j}] outside the block was written"); continue; }
                        double s = 0, a = 0;
                        for (int k = c0; k < c1; k++) { double p = (double)x[i * ldx + k] * w[j * K + k]; s += p; a += Math.Abs(p); }
                        Assert.True(Math.Abs(y[i * ldy + j] - s) <= 1e-5 * a + 1e-6, $"{type} {name} M={M} Y[{i},{j}]: {y[i * ldy + j]} vs {s}");
                    }
        }
    }

    [Fact]
    public void WeightBlocksAndSliceGemmRejectBadShapes()
    {
        var w = new WeightMatrix(64, WeightType.F32, 10, 20);
        Assert.Throws<ArgumentException>(() => w.Block(0, 11, 0, 20));
        Assert.Throws<ArgumentException>(() => w.Block(3, 3, 0, 20));
        Assert.Throws<ArgumentException>(() => w.Block(0, 10, 5, 21));
        Assert.Throws<ArgumentException>(() => new WeightMatrix(64, WeightType.Q8, 10, 32).Block(0, 5, 0, 32));
        var b = w.Block(2, 5, 4, 12);
        Assert.Equal((3, 8, 80L, 64 + 2 * 80 + 16L, 96L), (b.Rows, b.Cols, b.RowBytes, (long)b.Pointer, b.ByteLength));
        using var pool = new WorkerPool(1);
        var matmul = new MatMul(pool);
        var x = new float[8];
        var y = new float[8];
        fixed (float* xp = x, yp = y)
        {
            float* xq = xp, yq = yp;
            Assert.Throws<ArgumentOutOfRangeException>(() => new SliceGemm().Run(xq, 7, 1, [new(b, yq)]));            // X rows shorter than K
            Assert.Throws<ArgumentException>(() => new SliceGemm().Run(xq, 8, 1, [new(b, yq, 2)]));                   // Y rows shorter than the block
            Assert.Throws<ArgumentException>(() => matmul.Run(xq, 1, [new(b, yq)]));                                    // blocks are SliceGemm's
        }
    }

    public static TheoryData<int, int, int> MatMulShapes()
    {
        var data = new TheoryData<int, int, int>();
        foreach (int m in new[] { 1, 2, 3, 17, 64, 513 })
            foreach (var (k, n) in new[] { (1, 1), (15, 7), (17, 33), (100, 5), (257, 130), (1024, 203), (256, 67) })
                data.Add(m, k, n);
        data.Add(1, 4096, 39);    // the fp32 GEMV's four-stream kernel (K ≥ 4096), rows left over past 4 · q
        data.Add(1, 4100, 21);    // … K not a multiple of 16: back to two streams
        data.Add(1, 768, 400);    // the fp32 GEMV's parked sums: whole batches of 16 row pairs, pairs left over
        data.Add(1, 784, 37);     // … K a multiple of 16, not of 32; an odd row
        data.Add(64, 2100, 37);   // the packed GEMM's one or two panels: K blocks of 2048, a tail of 52
        data.Add(32, 4200, 11);   // … three blocks (fp32 and bf16; f16 takes the skinny tiles at 32 rows)
        data.Add(29, 300, 67);    // fp32, bf16: one panel 29/32 full takes the packed GEMM (f16: the skinny tiles)
        data.Add(30, 2100, 13);   // … over a K block and a tail
        return data;
    }

    // (1024, 203): K a multiple of 32 (the bf16 GEMV's four-row kernel), pool-sized, chunks whose row counts
    // are not multiples of 4.

    /// <summary>
    /// Batched-decode sizes for the skinny kernel: every X row-group shape (4-row and 8-row tiles, partial groups,
    /// several groups), weights whose row count is not a multiple of the 3-row tile (or below it), and K over one
    /// K block (1024) with a tail that is not a multiple of the vector width.
    /// </summary>
    public static TheoryData<int, int, int> SkinnyShapes()
    {
        var data = new TheoryData<int, int, int>();
        foreach (int m in new[] { 4, 5, 8, 9, 12, 13, 15, 16, 31, 32, 40, 63 })   // fp32 13–16: the packed GEMM's 16-row panel (k pairs)
            foreach (var (k, n) in new[] { (33, 2), (64, 13), (1030, 10), (2100, 4) })
                data.Add(m, k, n);
        data.Add(3, 4200, 11);    // M ≤ 8 streams K unblocked only up to 4096: two blocks, a tail, rows left over
        data.Add(7, 4200, 13);    // … the same through the 8-row tile
        data.Add(2, 700, 301);    // three streams over a pool-sized run, 301 = 3 · 100 + 1
        data.Add(16, 1024, 301);  // over 8 rows with K in one block: each 8-row group streams the chunk in turn
        data.Add(13, 1000, 97);   // … a 5-row last group, K not a multiple of the vector width
        data.Add(12, 64, 2050);   // … Y of 64 KiB a group: the sums parked and written in runs (StreamTiles)
        return data;
    }

    [Theory]
    [MemberData(nameof(MatMulShapes))]
    [MemberData(nameof(SkinnyShapes))]
    public void MatMulMatchesNaive(int M, int K, int N)
    {
        var x = Random(M * K, M * 31 + K);
        var wRaw = Random(N * K, N * 17 + K);
        foreach (var type in new[] { WeightType.F32, WeightType.BF16, WeightType.F16 })
        {
            var bytes = Store(wRaw, type, out var w);
            // reference in double, and the bound: 1e-5 of Σ|x·w| per output (fp32 accumulation over K terms)
            var reference = new double[M * N];
            var bound = new double[M * N];
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++)
                {
                    double s = 0, a = 0;
                    for (int k = 0; k < K; k++) { s += (double)x[m * K + k] * w[n * K + k]; a += Math.Abs((double)x[m * K + k] * w[n * K + k]); }
                    reference[m * N + n] = s;
                    bound[m * N + n] = 1e-5 * a + 1e-6;
                }
            foreach (var isa in new[] { SimdPolicy.Isa.V512, SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
                foreach (int threads in new[] { 1, 2, 3 })
                {
                    SimdPolicy.Force(isa);
                    try
                    {
                        using var pool = new WorkerPool(threads);
                        // cache-resident weights pick other GEMV kernels (16-row tiles, no bf16 prefetch)
                        foreach (bool resident in M == 1 ? new[] { false, true } : [false])
                        {
                            var mm = new MatMul(pool) { CacheResidentWeights = resident };
                            var y = new float[M * N];
                            fixed (float* xp = x, yp = y)
                            fixed (byte* wp = bytes)
                                mm.Run(xp, M, new WeightMatrix((nint)wp, type, N, K), yp);
                            for (int i = 0; i < y.Length; i++)
                                Assert.True(Math.Abs(y[i] - reference[i]) <= bound[i],
                                    $"{type} {isa} threads={threads} resident={resident} M={M} K={K} N={N} at {i}: {y[i]} vs {reference[i]}");
                        }
                    }
                    finally { SimdPolicy.Reset(); }
                }
        }
    }

    /// <summary>
    /// The skinny kernel's parked-sums path (5–8 rows, forced on for every Y size) gives the same bits as its direct
    /// stores and stays within the naive bound: partial sum batches, tails past the vector width, K blocks that add.
    /// </summary>
    [Theory]
    [InlineData(5, 33, 20)]
    [InlineData(7, 100, 301)]
    [InlineData(8, 768, 64)]
    [InlineData(8, 1030, 40)]
    [InlineData(6, 2100, 35)]
    [InlineData(8, 768, 400)]     // whole batches of 16 tiles, no tail: the vector write-out
    [InlineData(6, 2048, 300)]    // … the same over K blocks that add
    public void SkinnyParkedSumsMatchDirectStores(int M, int K, int N)
    {
        var x = Random(M * K, M * 7 + K);
        var wRaw = Random(N * K, N * 5 + K);
        long saved = MatMul.SkinnyBufferedSumsMinYBytes;
        try
        {
            foreach (var type in new[] { WeightType.F32, WeightType.BF16 })
            {
                var bytes = Store(wRaw, type, out var w);
                foreach (int threads in new[] { 1, 2 })
                {
                    using var pool = new WorkerPool(threads);
                    var mm = new MatMul(pool);
                    float[] RunWith(long minYBytes)
                    {
                        MatMul.SkinnyBufferedSumsMinYBytes = minYBytes;
                        var y = new float[M * N];
                        fixed (float* xp = x, yp = y)
                        fixed (byte* wp = bytes)
                            mm.Run(xp, M, new WeightMatrix((nint)wp, type, N, K), yp);
                        return y;
                    }
                    var parked = RunWith(0);
                    var direct = RunWith(long.MaxValue);
                    Assert.Equal(direct, parked);
                    for (int m = 0; m < M; m++)
                        for (int n = 0; n < N; n++)
                        {
                            double s = 0, a = 0;
                            for (int k = 0; k < K; k++) { s += (double)x[m * K + k] * w[n * K + k]; a += Math.Abs((double)x[m * K + k] * w[n * K + k]); }
                            Assert.True(Math.Abs(parked[m * N + n] - s) <= 1e-5 * a + 1e-6, $"{type} threads={threads} at ({m}, {n}): {parked[m * N + n]} vs {s}");
                        }
                }
            }
        }
        finally { MatMul.SkinnyBufferedSumsMinYBytes = saved; }
    }

    [Theory]
    [InlineData(257, 130)]    // above the serial threshold: chunks on the pool
    [InlineData(15, 7)]       // below it: on the caller
    [InlineData(1031, 67)]    // row bytes not a multiple of the vector width
    public void StreamOnlyGemvLoadsButNeitherComputesNorWrites(int K, int N)
    {
        var x = Random(K, K);
        var wRaw = Random(N * K, N);
        foreach (var type in new[] { WeightType.F32, WeightType.BF16, WeightType.F16 })
        {
            var bytes = Store(wRaw, type, out _);
            using var pool = new WorkerPool(2);
            var mm = new MatMul(pool) { StreamOnly = true };
            var y = Enumerable.Repeat(float.NaN, N + 1).ToArray();
            var real = new float[N];
            fixed (float* xp = x, yp = y, rp = real)
            fixed (byte* wp = bytes)
            {
                var w = new WeightMatrix((nint)wp, type, N, K);
                mm.Run(xp, 1, w, yp);
                Assert.All(y, v => Assert.True(float.IsNaN(v), $"{type}: stream-only wrote to Y"));
                mm.StreamOnly = false;
                mm.Run(xp, 1, w, rp);
            }
            Assert.All(real, v => Assert.False(float.IsNaN(v)));
        }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(9)]
    [InlineData(40)]
    [InlineData(513)]
    public void GroupedProductsMatchSeparateOnes(int M)
    {
        const int K = 45;
        var x = Random(M * K, M);
        var shapes = new[] { (37, WeightType.F32), (8, WeightType.BF16), (70, WeightType.F16) };
        using var pool = new WorkerPool(3);
        var mm = new MatMul(pool);
        var weights = shapes.Select((s, i) => Store(Random(s.Item1 * K, 100 + i), s.Item2, out _)).ToArray();
        var grouped = shapes.Select(s => new float[M * s.Item1]).ToArray();
        var separate = shapes.Select(s => new float[M * s.Item1]).ToArray();
        fixed (float* xp = x, g0 = grouped[0], g1 = grouped[1], g2 = grouped[2], s0 = separate[0], s1 = separate[1], s2 = separate[2])
        fixed (byte* w0 = weights[0], w1 = weights[1], w2 = weights[2])
        {
            var ws = new[] { new WeightMatrix((nint)w0, shapes[0].Item2, 37, K), new WeightMatrix((nint)w1, shapes[1].Item2, 8, K), new WeightMatrix((nint)w2, shapes[2].Item2, 70, K) };
            mm.Run(xp, M, [new MatMul.Product(ws[0], g0), new MatMul.Product(ws[1], g1), new MatMul.Product(ws[2], g2)]);
            mm.Run(xp, M, ws[0], s0);
            mm.Run(xp, M, ws[1], s1);
            mm.Run(xp, M, ws[2], s2);
        }
        for (int i = 0; i < shapes.Length; i++) Assert.Equal(separate[i], grouped[i]);
    }

    /// <summary>
    /// A GEMV from DRAM on two threads is cut once per product at a split that follows the cores' speeds
    /// (<see cref="MatMul.SplitDramGemv"/>): every split gives the naive result within its bound and the same bits,
    /// so a row's sum never depends on timing; grouped products (q/k/v-like) and each weight type.
    /// </summary>
    [Theory]
    [InlineData(768, 384)]   // fp32: 16-row parked groups; bf16: four-row kernel
    [InlineData(300, 128)]   // K not a multiple of 16 or 32: the two-row kernels
    public void SplitGemvMatchesNaiveAtEverySplit(int K, int N) => SplitMatchesNaiveAtEverySplit(1, K, [N, 64, 128]);

    /// <summary>The same for the skinny GEMM (<see cref="MatMul.SplitSkinny"/>: 4- and 8-row tiles, rows past the
    /// 3-row tiles, K blocks that add, several 8-row groups over each half's pieces) and the packed GEMM
    /// (<see cref="MatMul.SplitPacked"/>).</summary>
    [Theory]
    [InlineData(2, 768)]
    [InlineData(5, 2100)]
    [InlineData(8, 300)]
    [InlineData(12, 768)]     // over 8 rows: each half in pieces; fp32 streams each 8-row group, bf16 and f16 take tiles
    [InlineData(16, 1100)]    // … K over one block (fp32: the packed GEMM's 16-row panel)
    [InlineData(15, 768)]     // fp32: a 16-row panel with one row empty
    [InlineData(32, 300)]     // fp32, bf16: the packed GEMM's one panel (f16: the skinny tiles)
    [InlineData(64, 2100)]    // the packed GEMM's two panels over a K block and a tail
    public void SplitSkinnyMatchesNaiveAtEverySplit(int M, int K) => SplitMatchesNaiveAtEverySplit(M, K, [300, 97, 2050]);

    private void SplitMatchesNaiveAtEverySplit(int M, int K, int[] rows)
    {
        var x = Random(M * K, M * K);
        using var pool = new WorkerPool(2);
        foreach (var type in new[] { WeightType.F32, WeightType.BF16, WeightType.F16 })
        {
            var raw = rows.Select((n, i) => Random(n * K, 7 * n + i)).ToArray();
            var stored = new float[rows.Length][];
            var bytes = raw.Select((w, i) => Store(w, type, out stored[i])).ToArray();
            var mm = new MatMul(pool);
            float[][]? first = null;
            foreach (double share in new[] { 0.5, 0.25, 0.4, 0.75, 0.6 })
            {
                mm.SplitShare = mm.SkinnySplitShare = mm.PackedSplitShare = share;
                var ys = rows.Select(n => new float[M * n]).ToArray();
                fixed (float* xp = x, y0 = ys[0], y1 = ys[1], y2 = ys[2])
                fixed (byte* w0 = bytes[0], w1 = bytes[1], w2 = bytes[2])
                    mm.Run(xp, M, [new MatMul.Product(new WeightMatrix((nint)w0, type, rows[0], K), y0),
                        new MatMul.Product(new WeightMatrix((nint)w1, type, rows[1], K), y1),
                        new MatMul.Product(new WeightMatrix((nint)w2, type, rows[2], K), y2)]);
                if (first != null)
                {
                    // every other split: the first split's bits (which met the naive bound)
                    for (int p = 0; p < rows.Length; p++) Assert.Equal(first[p], ys[p]);
                    continue;
                }
                for (int p = 0; p < rows.Length; p++)
                    for (int m = 0; m < M; m++)
                        for (int n = 0; n < rows[p]; n++)
                        {
                            double s = 0, a = 0;
                            for (int k = 0; k < K; k++) { s += (double)x[m * K + k] * stored[p][n * K + k]; a += Math.Abs((double)x[m * K + k] * stored[p][n * K + k]); }
                            Assert.True(Math.Abs(ys[p][m * rows[p] + n] - s) <= 1e-5 * a + 1e-6, $"{type} M {M} share {share} product {p} row {m}, {n}: {ys[p][m * rows[p] + n]} vs {s}");
                        }
                first = ys;
            }
        }
    }

    [Fact]
    public void F16WideningHandlesSubnormalsInfinityAndNaN()
    {
        ushort[] bits = [0x0000, 0x8000, 0x0001, 0x03ff, 0x0400, 0x3c00, 0xbc00, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x3555, 0xc123, 0x1234, 0x0200, 0x8001];
        var dst = new float[bits.Length];
        fixed (ushort* p = bits)
        fixed (float* d = dst)
            Widen.ToF32(WeightType.F16, (nint)p, d, bits.Length);   // 16 values: exactly one Vector512
        for (int i = 0; i < bits.Length; i++)
        {
            float expected = (float)BitConverter.UInt16BitsToHalf(bits[i]);
            Assert.True(expected.Equals(dst[i]), $"0x{bits[i]:x4}: {dst[i]} vs {expected}");
        }
    }

    [Theory]
    [InlineData(1, 1)]
    [InlineData(3, 17)]
    [InlineData(5, 256)]
    [InlineData(2, 1001)]
    public void RmsNormMatchesNaive(int rows, int n)
    {
        var x = Random(rows * n, n);
        var w = Random(n, n + 1);
        var y = new float[rows * n];
        fixed (float* xp = x, wp = w, yp = y) Ops.RmsNorm(xp, wp, yp, rows, n, 1e-5f);
        for (int r = 0; r < rows; r++)
        {
            double ms = 0;
            for (int i = 0; i < n; i++) ms += (double)x[r * n + i] * x[r * n + i];
            double inv = 1 / Math.Sqrt(ms / n + 1e-5);
            for (int i = 0; i < n; i++)
                Assert.Equal(x[r * n + i] * inv * w[i], y[r * n + i], 1e-5);
        }
    }

    /// <summary>ulps between a float and the double it approximates (at the float's own spacing).</summary>
    private static double Ulps(float got, double want)
    {
        float w = (float)Math.Abs(want);
        double ulp = Math.Max((double)MathF.BitIncrement(w) - w, float.Epsilon);
        return Math.Abs(got - want) / ulp;
    }

    /// <summary>FastExp within 2 ulp of double exp on normal results, and every width gives the same bits.</summary>
    [Fact]
    public void FastExpMatchesDoubleWithinTwoUlp()
    {
        var r = new Random(17);
        int n = 100_003;   // not a multiple of any width: tails in every path
        var x = new float[n];
        for (int i = 0; i < n; i++) x[i] = (float)(r.NextDouble() * 195 - 105);   // [−105, 90): underflow to overflow
        for (int i = 0; i < 2000; i++) x[i] = (float)(r.NextDouble() * 2 - 1);     // dense near 0 too
        float[]? first = null;
        try
        {
            foreach (var isa in new[] { SimdPolicy.Isa.V512, SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
            {
                SimdPolicy.Force(isa);
                var y = new float[n];
                FastExp.Exp(x, y);
                double worst = 0;
                for (int i = 0; i < n; i++)
                {
                    double want = Math.Exp(x[i]);
                    if (want > float.MaxValue) { Assert.Equal(float.PositiveInfinity, y[i]); continue; }
                    if (want < 1.1754943508222875e-38)   // denormal or zero result: within one denormal step
                    {
                        Assert.True(Math.Abs(y[i] - want) <= 1.5 * float.Epsilon, $"exp({x[i]}) = {y[i]}, want {want}");
                        continue;
                    }
                    worst = Math.Max(worst, Ulps(y[i], want));
                }
                Assert.True(worst <= 2, $"{isa}: worst error {worst:F2} ulp");
                if (first == null) first = y;
                else Assert.Equal(first, y);   // the scalar tail repeats the vector lanes' arithmetic
            }
        }
        finally { SimdPolicy.Reset(); }
    }

    [Fact]
    public void FastExpEdgeValues()
    {
        float[] x = [0f, -0f, float.NegativeInfinity, float.PositiveInfinity, float.NaN, 88.72283f, 88.7229f, -87.33654f, -103.9f, -104.5f, 1f];
        try
        {
            foreach (var isa in new[] { SimdPolicy.Isa.V512, SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
            {
                SimdPolicy.Force(isa);
                var padded = new float[32];   // every value inside a vector as well as in the tail
                for (int rep = 0; rep < 2; rep++)
                {
                    int at = rep == 0 ? 0 : 32 - x.Length;
                    x.CopyTo(padded, at);
                    var y = new float[32];
                    FastExp.Exp(padded, y);
                    var e = y.AsSpan(at, x.Length);
                    Assert.Equal(1f, e[0]);
                    Assert.Equal(1f, e[1]);
                    Assert.Equal(0f, e[2]);
                    Assert.Equal(float.PositiveInfinity, e[3]);
                    Assert.True(float.IsNaN(e[4]));
                    Assert.True(float.IsFinite(e[5]) && e[5] > 3.4e38f, $"exp(88.72283) = {e[5]}");
                    Assert.Equal(float.PositiveInfinity, e[6]);
                    Assert.True(e[7] > 1.1e-38f && e[7] < 1.2e-38f, $"exp(-87.33654) = {e[7]}");
                    Assert.True(e[8] > 0 && e[8] < 1e-44f, $"exp(-103.9) = {e[8]}");
                    Assert.Equal(0f, e[9]);
                    Assert.True(Ulps(e[10], Math.E) <= 1);
                }
            }
        }
        finally { SimdPolicy.Reset(); }
    }

    /// <summary>
    /// Prompt rows take their causal softmax four at a time (interleaved exponentials, masked tails); batch-invariant
    /// and odd-sized groups take it row by row. Both must give the same bits, and the softmax itself must match
    /// double precision, with zeros from each row's keys to the padding, at every width.
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(13)]
    [InlineData(16)]
    [InlineData(29)]
    [InlineData(45)]
    public void CausalSoftmaxFourRowsAtATimeGivesTheRowByRowBits(int keys0)
    {
        int stride = 80, padTo = (keys0 + 3 + 15) / 16 * 16;
        var x = Random(4 * stride, 70 + keys0, 8f);
        try
        {
            foreach (var isa in new[] { SimdPolicy.Isa.V512, SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
            {
                SimdPolicy.Force(isa);
                var four = (float[])x.Clone();
                var rows = (float[])x.Clone();
                fixed (float* a = four, b = rows)
                {
                    FastExp.CausalSoftmax4(a, stride, keys0, padTo);
                    for (int i = 0; i < 4; i++) FastExp.CausalSoftmax(b + i * stride, keys0 + i, padTo);
                }
                for (int i = 0; i < 4; i++)
                {
                    int keys = keys0 + i;
                    double max = Enumerable.Range(0, keys).Max(j => x[i * stride + j]);
                    double sum = Enumerable.Range(0, keys).Sum(j => Math.Exp(x[i * stride + j] - max));
                    for (int j = 0; j < stride; j++)
                    {
                        int at = i * stride + j;
                        Assert.True(BitConverter.SingleToInt32Bits(four[at]) == BitConverter.SingleToInt32Bits(rows[at]), $"{isa} row {i} key {j}: {four[at]} vs {rows[at]}");
                        double want = j < keys ? Math.Exp(x[at] - max) / sum : j < padTo ? 0 : x[at];   // past padTo: untouched
                        Assert.True(Math.Abs(four[at] - want) <= 1e-6 * Math.Abs(want) + 1e-9, $"{isa} row {i} key {j}: {four[at]} vs {want}");
                    }
                }
            }
        }
        finally { SimdPolicy.Reset(); }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(15)]
    [InlineData(37)]
    [InlineData(513)]
    public void ExpShiftedSumMatchesNaive(int n)
    {
        var x = Random(n, 40 + n, 20f);
        float shift = x.Max();
        try
        {
            foreach (var isa in new[] { SimdPolicy.Isa.V512, SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
            {
                SimdPolicy.Force(isa);
                var e = (float[])x.Clone();
                float sum = FastExp.ExpShiftedSum(e, shift);
                double want = 0;
                for (int i = 0; i < n; i++)
                {
                    double ei = Math.Exp(x[i] - shift);   // the argument rounded to fp32 as the kernel rounds it
                    want += ei;
                    Assert.True(Math.Abs(e[i] - ei) <= 3e-7 * ei + 1e-38, $"{isa} {i}: {e[i]} vs {ei}");
                }
                Assert.True(Math.Abs(sum - want) <= 1e-6 * want, $"{isa}: sum {sum} vs {want}");
            }
        }
        finally { SimdPolicy.Reset(); }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(33)]
    [InlineData(5000)]
    public void SwiGluMatchesNaive(int n)
    {
        var g = Random(n, n, 6);
        var u = Random(n, n + 1, 3);
        var gate = (float[])g.Clone();
        try
        {
            foreach (var isa in new[] { SimdPolicy.Isa.V512, SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
            {
                SimdPolicy.Force(isa);
                g.CopyTo(gate, 0);
                fixed (float* gp = gate, up = u) Ops.SwiGlu(gp, up, n);
                for (int i = 0; i < n; i++)
                {
                    double expected = g[i] / (1 + Math.Exp(-g[i])) * u[i];
                    Assert.True(Math.Abs(gate[i] - expected) <= 1e-6 * Math.Max(1e-3, Math.Abs(expected)), $"{isa} {i}: {gate[i]} vs {expected}");
                }
            }
        }
        finally { SimdPolicy.Reset(); }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(19)]
    [InlineData(4096)]
    public void SoftmaxMatchesNaive(int n)
    {
        var x = Random(n, n, 20);
        var y = (float[])x.Clone();
        fixed (float* yp = y) Ops.Softmax(yp, n);
        double max = x.Max(), sum = x.Sum(v => Math.Exp(v - max));
        for (int i = 0; i < n; i++) Assert.Equal(Math.Exp(x[i] - max) / sum, y[i], 1e-6);
    }

    [Theory]
    [InlineData(2, 3, 0)]
    [InlineData(10, 2, 7)]
    [InlineData(64, 4, 511)]
    [InlineData(32, 8, 200)]     // half = one Vector512
    [InlineData(48, 3, 100)]     // 16 + 8
    [InlineData(56, 2, 33)]      // 16 + 8 + 4 scalar
    public void RopeMatchesRotateHalfFormula(int hd, int heads, int pos)
    {
        var table = new RopeTable(hd, 512, 10000, null);
        var x = Random(hd * heads, hd + pos);
        var y = (float[])x.Clone();
        fixed (float* yp = y) table.Apply(yp, heads, pos);
        foreach (var isa in new[] { SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
        {
            // every vector width gives the same bits (products and differences rounded one by one)
            var z = (float[])x.Clone();
            SimdPolicy.Force(isa);
            try { fixed (float* zp = z) table.Apply(zp, heads, pos); }
            finally { SimdPolicy.Reset(); }
            Assert.Equal(y, z);
        }
        int half = hd / 2;
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++)
            {
                double f = 1.0 / Math.Pow(10000, 2.0 * i / hd), c = Math.Cos(pos * f), s = Math.Sin(pos * f);
                double a = x[h * hd + i], b = x[h * hd + i + half];
                Assert.Equal(a * c - b * s, y[h * hd + i], 2e-4);
                Assert.Equal(b * c + a * s, y[h * hd + i + half], 2e-4);
            }
    }

    [Theory]
    [InlineData(1, 0, 4, 4, 8, false)]
    [InlineData(5, 3, 6, 3, 10, false)]
    [InlineData(7, 30, 8, 2, 32, true)]
    [InlineData(1, 40, 8, 2, 32, true)]
    [InlineData(17, 15, 4, 1, 64, true)]
    [InlineData(3, 47, 2, 2, 64, false)]
    [InlineData(40, 0, 4, 2, 128, true)]
    [InlineData(2, 33, 3, 1, 96, false)]
    // one decode row over 16+ tiles: cut by positions into parts and merged (Attention.FlashDecode), 2–4 parts of
    // 4–12 tiles, the last tile unfinished or full, GQA pairs and single heads, hd 16 (no ·V pair kernel), 64, 96
    // (rows from 2 tiles are split too: (1, 40, …) above)
    [InlineData(1, 255, 4, 4, 64, false)]
    [InlineData(1, 300, 8, 2, 32, true)]
    [InlineData(1, 383, 6, 3, 16, true)]
    [InlineData(1, 270, 4, 1, 96, false)]
    public void AttentionMatchesNaive(int S, int start, int H, int G, int hd, bool paged)
    {
        int ctx = start + S, kvd = G * hd;
        var q = Random(S * H * hd, S + start);
        var keys = Random(ctx * kvd, ctx + 1);
        var vals = Random(ctx * kvd, ctx + 2);

        // Paged: 16-position blocks scattered through a pool in a shuffled order, with spare blocks around them.
        const int B = KvView.Tile;
        int tiles = (ctx + B - 1) / B, poolTiles = tiles + 3;
        var table = Enumerable.Range(0, tiles).Select(i => poolTiles - 1 - 2 * i % poolTiles).ToArray();
        if (table.Distinct().Count() != tiles) table = Enumerable.Range(0, tiles).Reverse().ToArray();
        var kPool = new byte[poolTiles * B * kvd * 4];
        var vPool = new byte[poolTiles * B * kvd * 4];

        foreach (var kvType in new[] { KvType.F32, KvType.BF16 })
        {
            // bf16 storage rounds keys and values: the reference uses the rounded values.
            var kRef = kvType == KvType.F32 ? keys : keys.Select(v => TestSafetensors.RoundTo(v, "BF16")).ToArray();
            var vRef = kvType == KvType.F32 ? vals : vals.Select(v => TestSafetensors.RoundTo(v, "BF16")).ToArray();
            foreach (var isa in new[] { SimdPolicy.Isa.V512, SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
            {
                var output = new float[S * H * hd];
                SimdPolicy.Force(isa);
                try
                {
                    using var pool = new WorkerPool(2);
                    var att = new Attention(pool, 512);
                    fixed (float* qp = q, kp = keys, vp = vals, op = output)
                    fixed (byte* kpp = kPool, vpp = vPool)
                    fixed (int* tp = table)
                    {
                        var view = new KvView(kpp, vpp, kvd, kvType, paged ? tp : null);
                        // Rows in uneven batches (some spanning whole tiles), as prefill chunks and decode steps write them.
                        for (int p = 0; p < ctx;)
                        {
                            int n = Math.Min(ctx - p, 1 + p * 7 % 37);
                            view.WriteRows(p, n, kp + p * kvd, vp + p * kvd);
                            p += n;
                        }
                        for (int p = 0; p < ctx; p++)
                            for (int e = 0; e < kvd; e++)
                            {
                                Assert.Equal(kRef[p * kvd + e], view.KeyAt(p, e, ctx));
                                Assert.Equal(vRef[p * kvd + e], view.ValueAt(p, e));
                            }
                        att.Run(qp, S, start, H, G, hd, view, op);
                    }
                }
                finally { SimdPolicy.Reset(); }

                for (int t = 0; t < S; t++)
                    for (int h = 0; h < H; h++)
                    {
                        int g = h / (H / G), pos = start + t;
                        var scores = new double[pos + 1];
                        for (int j = 0; j <= pos; j++)
                        {
                            double sc = 0;
                            for (int i = 0; i < hd; i++) sc += (double)q[(t * H + h) * hd + i] * kRef[j * kvd + g * hd + i];
                            scores[j] = sc / Math.Sqrt(hd);
                        }
                        double max = scores.Max(), sum = scores.Sum(v => Math.Exp(v - max));
                        for (int i = 0; i < hd; i++)
                        {
                            double o = 0;
                            for (int j = 0; j <= pos; j++) o += Math.Exp(scores[j] - max) / sum * vRef[j * kvd + g * hd + i];
                            Assert.True(Math.Abs(o - output[(t * H + h) * hd + i]) < 1e-5, $"{kvType} {isa} t={t} h={h} i={i}: {output[(t * H + h) * hd + i]} vs {o}");
                        }
                    }
            }
        }
    }

    /// <summary>
    /// A decode step of several sequences at once (one row each, at positions on and off tile edges) next to a
    /// prefill chunk, each over its own KV: the one-row streaming path and the general path against the naive sums,
    /// with few and many workers (runs of one head up to all heads per chunk).
    /// </summary>
    [Theory]
    [InlineData(8, 2, 32)]
    [InlineData(4, 4, 64)]
    [InlineData(6, 3, 16)]
    public void AttentionOverManySequencesMatchesNaive(int H, int G, int hd)
    {
        int kvd = G * hd;
        (int Start, int Count)[] seqs = [(0, 1), (15, 1), (16, 1), (40, 1), (7, 3), (33, 1)];
        int T = seqs.Sum(x => x.Count);
        var q = Random(T * H * hd, H + hd);
        var keys = seqs.Select((x, i) => Random((x.Start + x.Count) * kvd, 100 + i)).ToArray();
        var vals = seqs.Select((x, i) => Random((x.Start + x.Count) * kvd, 200 + i)).ToArray();
        foreach (bool invariant in new[] { false, true })
            foreach (int threads in new[] { 1, 2, 7 })
            {
                var output = new float[T * H * hd];
                var kBufs = seqs.Select(x => new float[((x.Start + x.Count + KvView.Tile - 1) / KvView.Tile) * KvView.Tile * kvd]).ToArray();
                var vBufs = seqs.Select(x => new float[((x.Start + x.Count + KvView.Tile - 1) / KvView.Tile) * KvView.Tile * kvd]).ToArray();
                var handles = kBufs.Concat(vBufs).Select(b => GCHandle.Alloc(b, GCHandleType.Pinned)).ToList();
                try
                {
                    using var pool = new WorkerPool(threads);
                    var att = new Attention(pool, 64) { BatchInvariant = invariant };
                    var segments = new AttentionSegment[seqs.Length];
                    int row = 0;
                    for (int i = 0; i < seqs.Length; i++)
                    {
                        var view = new KvView((float*)handles[i].AddrOfPinnedObject(), (float*)handles[seqs.Length + i].AddrOfPinnedObject(), kvd);
                        fixed (float* kp = keys[i], vp = vals[i]) view.WriteRows(0, seqs[i].Start + seqs[i].Count, kp, vp);
                        segments[i] = new AttentionSegment(row, seqs[i].Count, seqs[i].Start, view);
                        row += seqs[i].Count;
                    }
                    fixed (float* qp = q, op = output) att.Run(qp, H, G, hd, segments, op);
                }
                finally { foreach (var h in handles) h.Free(); }

                int r0 = 0;
                for (int i = 0; i < seqs.Length; r0 += seqs[i].Count, i++)
                    for (int t = 0; t < seqs[i].Count; t++)
                        for (int h = 0; h < H; h++)
                        {
                            int g = h / (H / G), pos = seqs[i].Start + t, r = r0 + t;
                            var sc = new double[pos + 1];
                            for (int j = 0; j <= pos; j++)
                            {
                                for (int e = 0; e < hd; e++) sc[j] += (double)q[(r * H + h) * hd + e] * keys[i][j * kvd + g * hd + e];
                                sc[j] /= Math.Sqrt(hd);
                            }
                            double max = sc.Max(), sum = sc.Sum(v => Math.Exp(v - max));
                            for (int e = 0; e < hd; e++)
                            {
                                double o = 0;
                                for (int j = 0; j <= pos; j++) o += Math.Exp(sc[j] - max) / sum * vals[i][j * kvd + g * hd + e];
                                Assert.True(Math.Abs(o - output[(r * H + h) * hd + e]) < 1e-5,
                                    $"invariant={invariant} threads={threads} seq {i} row {t} head {h} dim {e}: {output[(r * H + h) * hd + e]} vs {o}");
                            }
                        }
            }
    }

    /// <summary>
    /// Decode takes the two query heads of a GQA pair together (each key and value loaded once for both): the pair
    /// kernels sum in the single-head order, so the outputs must be the same bits with pairing off. Groups of 2 and 4,
    /// hd 32 and 64 (there the single heads' ·V walks 64 columns at a time, the pairs' 32), fp32 and bf16 KV, lengths
    /// inside and on the edge of a tile; at 150 keys the row is split by positions.
    /// </summary>
    [Theory]
    [InlineData(8, 4, 32, 150)]
    [InlineData(8, 2, 64, 64)]
    [InlineData(4, 2, 32, 17)]
    public void DecodeAttentionPairsGqaHeadsBitForBit(int H, int G, int hd, int keys)
    {
        if (!System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated) return;   // the pair kernels are the Vector512 decode path
        var q = Random(H * hd, keys);
        var kv = Random(keys * G * hd, keys + 1);
        foreach (var type in new[] { KvType.F32, KvType.BF16 })
        {
            var outputs = DecodeRowPasses(H, G, hd, keys, q, kv, kv, type, 2, pass => Attention.PairHeads = pass == 0, () => Attention.PairHeads = true);
            Assert.Equal(outputs[1], outputs[0]);
        }
    }

    /// <summary>
    /// Decode takes the values of two adjacent KV heads of 64 together where each query head has its own (no GQA
    /// sharing): each head summed in the single-head order, so the outputs must be the same bits with it off. An odd
    /// number of heads (the last one alone), key counts inside a tile, on its edge and split by positions; fp32 and
    /// bf16 KV.
    /// </summary>
    [Theory]
    [InlineData(12, 64, 61)]
    [InlineData(5, 64, 16)]
    [InlineData(4, 64, 333)]
    [InlineData(3, 64, 7)]
    public void DecodeValuesOfTwoKvHeadsBitForBit(int H, int hd, int keys)
    {
        if (!System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated) return;   // the Vector512 decode path
        var q = Random(H * hd, keys + 3);
        var k = Random(keys * H * hd, keys + 4);
        var v = Random(keys * H * hd, keys + 5);
        foreach (var type in new[] { KvType.F32, KvType.BF16 })
        {
            var outputs = DecodeRowPasses(H, H, hd, keys, q, k, v, type, 2, pass => Attention.TwoKvHeads = pass == 0, () => Attention.TwoKvHeads = true);
            Assert.Equal(outputs[1], outputs[0]);
            Assert.Contains(outputs[0], x => x != 0);
        }
    }

    /// <summary>
    /// A prompt's four-row scores take two key tiles at a time (eight chains): each score summed in the one-tile
    /// kernel's order, so the outputs must be the same bits with the switch off. Prompts from a tile's start and from
    /// inside one, over an odd and an even number of tiles, the last unfinished or full; fp32 and bf16 KV.
    /// </summary>
    [Theory]
    [InlineData(0, 29, 32)]
    [InlineData(5, 40, 64)]
    [InlineData(16, 48, 32)]
    public void PromptScoresTwoTilesAtATimeBitForBit(int start, int count, int hd)
    {
        int H = 8, G = 4, kvd = G * hd, len = start + count;
        var q = Random(count * H * hd, 21 + count);
        var keys = Random(len * kvd, 22 + len);
        var vals = Random(len * kvd, 23 + len);
        foreach (var type in new[] { KvType.F32, KvType.BF16 })
        {
            var outputs = new float[2][];
            for (int pass = 0; pass < 2; pass++)
            {
                int ctx = (len + KvView.Tile - 1) / KvView.Tile * KvView.Tile;
                var kBuf = new byte[ctx * kvd * 4];
                var vBuf = new byte[ctx * kvd * 4];
                outputs[pass] = new float[count * H * hd];
                Attention.TwoTiles = pass == 0;
                try
                {
                    fixed (byte* kb = kBuf, vb = vBuf)
                    fixed (float* kp = keys, vp = vals, qp = q, op = outputs[pass])
                    {
                        var view = new KvView(kb, vb, kvd, type);
                        view.WriteRows(0, len, kp, vp);
                        using var pool = new WorkerPool(2);
                        new Attention(pool, ctx).Run(qp, H, G, hd, [new AttentionSegment(0, count, start, view)], op);
                    }
                }
                finally { Attention.TwoTiles = true; }
            }
            Assert.Equal(outputs[1], outputs[0]);
        }
    }

    /// <summary>
    /// q and output in blocks of heads, one per thread, each [rows × its heads·hd] in its own array (the
    /// tensor-parallel passes' layout): every head's output the same bits as from one [rows × H·hd] array. A prompt
    /// (four-row groups and a remainder, an unfinished last tile) and decode rows short and long enough to be cut by
    /// positions; fp32 and bf16 KV.
    /// </summary>
    [Theory]
    [InlineData(0, 29, 2)]
    [InlineData(5, 40, 4)]
    [InlineData(20, 1, 2)]
    [InlineData(100, 1, 4)]
    public void HeadBlocksGiveTheSameBitsAsOneArray(int start, int count, int blocks)
    {
        if (!System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated) return;   // decode by heads is the Vector512 path
        int H = 8, G = 4, hd = 32, kvd = G * hd, len = start + count, n = H / blocks, ctx = (len + KvView.Tile - 1) / KvView.Tile * KvView.Tile;
        var q = Random(count * H * hd, 31 + len);
        var keys = Random(len * kvd, 32 + len);
        var vals = Random(len * kvd, 33 + len);
        foreach (var type in new[] { KvType.F32, KvType.BF16 })
        {
            var whole = new float[count * H * hd];
            var qBlocks = new float[blocks][];
            var outBlocks = new float[blocks][];
            for (int b = 0; b < blocks; b++)
            {
                qBlocks[b] = new float[count * n * hd + 7];   // a stride of n·hd, at an odd offset from any other block
                outBlocks[b] = new float[count * n * hd + 7];
                for (int r = 0; r < count; r++) Array.Copy(q, (r * H + b * n) * hd, qBlocks[b], r * n * hd, n * hd);
            }
            var kBuf = new byte[ctx * kvd * 4];
            var vBuf = new byte[ctx * kvd * 4];
            var handles = qBlocks.Concat(outBlocks).Select(a => GCHandle.Alloc(a, GCHandleType.Pinned)).ToList();
            try
            {
                fixed (byte* kb = kBuf, vb = vBuf)
                fixed (float* kp = keys, vp = vals, qp = q, op = whole)
                {
                    var view = new KvView(kb, vb, kvd, type);
                    view.WriteRows(0, len, kp, vp);
                    using var pool = new WorkerPool(blocks);
                    var att = new Attention(pool, ctx);
                    nint[] qb = handles.Take(blocks).Select(h => h.AddrOfPinnedObject()).ToArray(), ob = handles.Skip(blocks).Select(h => h.AddrOfPinnedObject()).ToArray();
                    if (count == 1)
                    {
                        att.PrepareDecode(qp, H, G, hd, op);
                        att.DecodeHeads(view, start, 0, H, 0);
                        att.PrepareDecode(qb, H, G, hd, ob);
                        for (int b = 0; b < blocks; b++) att.DecodeHeads(view, start, b * n, (b + 1) * n, b);
                    }
                    else
                    {
                        att.PreparePrefill(qp, H, G, hd, [new AttentionSegment(0, count, start, view)], op);
                        att.PrefillHeads(0, 0, H, 0);
                        att.PreparePrefill(qb, H, G, hd, [new AttentionSegment(0, count, start, view)], ob);
                        for (int b = 0; b < blocks; b++) att.PrefillHeads(0, b * n, (b + 1) * n, b);
                    }
                }
            }
            finally { foreach (var h in handles) h.Free(); }
            for (int r = 0; r < count; r++)
                for (int b = 0; b < blocks; b++)
                    Assert.Equal(whole.AsSpan((r * H + b * n) * hd, n * hd).ToArray(), outBlocks[b].AsSpan(r * n * hd, n * hd).ToArray());
        }
    }

    /// <summary>
    /// One decode row (the last of <paramref name="keys"/> positions, 2 threads) computed <paramref name="passes"/>
    /// times over the same KV, <paramref name="before"/>(pass) setting a switch and <paramref name="after"/> resetting it.
    /// </summary>
    private static float[][] DecodeRowPasses(int H, int G, int hd, int keys, float[] q, float[] k, float[] v, KvType type, int passes, Action<int> before, Action after)
    {
        int kvd = G * hd, ctx = (keys + KvView.Tile - 1) / KvView.Tile * KvView.Tile;
        var kBuf = new byte[ctx * kvd * 4];
        var vBuf = new byte[ctx * kvd * 4];
        var outputs = new float[passes][];
        fixed (float* qp = q, kp = k, vp = v)
        fixed (byte* kb = kBuf, vb = vBuf)
        {
            var view = new KvView(kb, vb, kvd, type);
            view.WriteRows(0, keys, kp, vp);
            using var pool = new WorkerPool(2);
            var att = new Attention(pool, ctx);
            for (int pass = 0; pass < passes; pass++)
            {
                outputs[pass] = new float[H * hd];
                before(pass);
                try { fixed (float* op = outputs[pass]) att.Run(qp, 1, keys - 1, H, G, hd, view, op); }
                finally { after(); }
            }
        }
        return outputs;
    }

    /// <summary>
    /// A decode row cut by positions (<see cref="Attention.FlashDecode"/>) against the same row cut by heads: close
    /// (the parts' sums are merged in another order), and the same bits every call, whichever thread runs which part.
    /// </summary>
    [Theory]
    [InlineData(12, 12, 64, 500)]
    [InlineData(8, 2, 32, 257)]
    [InlineData(12, 12, 64, 40)]    // two parts of one tile each, the second unfinished
    [InlineData(8, 2, 32, 80)]     // (fewer keys than this run serially: below Attention.SerialWork)
    public void SplitDecodeRowsAgreeWithTheHeadsCutAndRepeat(int H, int G, int hd, int keys)
    {
        if (!System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated) return;   // decode rows are the Vector512 path
        var q = Random(H * hd, keys);
        var k = Random(keys * G * hd, keys + 1);
        var v = Random(keys * G * hd, keys + 2);
        foreach (var type in new[] { KvType.F32, KvType.BF16 })
        {
            var outputs = DecodeRowPasses(H, G, hd, keys, q, k, v, type, 4, pass => Attention.FlashDecode = pass != 0, () => Attention.FlashDecode = true);
            for (int i = 0; i < H * hd; i++)
                Assert.True(Math.Abs(outputs[1][i] - outputs[0][i]) <= 2e-6 + 1e-5 * Math.Abs(outputs[0][i]), $"{type} [{i}]: {outputs[1][i]} split vs {outputs[0][i]} by heads");
            Assert.NotEqual(outputs[0], outputs[1]);   // the split really ran (another summation order)
            Assert.Equal(outputs[1], outputs[2]);
            Assert.Equal(outputs[1], outputs[3]);
        }
    }

    [Fact]
    public void LargePagesGiveAlignedWritableMemoryOfEverySize()
    {
        foreach (nuint bytes in new nuint[] { 1, 4095, (1 << 20) - 1, 1 << 20, (3 << 20) + 5 })
        {
            byte* p = (byte*)LargePages.Alloc(bytes);
            try
            {
                Assert.True((nuint)p % (bytes < (1 << 20) ? 64u : (uint)LargePages.PageBytes) == 0, $"{bytes} bytes at {(nuint)p:x}");
                for (nuint i = 0; i < bytes; i += 4096) p[i] = (byte)i;
                p[bytes - 1] = 7;
                Assert.Equal(7, p[bytes - 1]);
            }
            finally { LargePages.Free(p); }
        }
    }

    [Fact]
    public void WorkerPoolRunsEveryChunkOnceAndSurfacesErrors()
    {
        using var pool = new WorkerPool(3);
        var job = new CountingJob(1000);
        for (int rep = 0; rep < 50; rep++)
        {
            job.Reset();
            pool.Run(job, 1000);
            Assert.All(job.Hits, h => Assert.Equal(1, h));
        }
        Assert.Throws<AggregateException>(() => pool.Run(new ThrowingJob(), 10));
        job.Reset();
        pool.Run(job, 1000);  // still usable after a failure
        Assert.All(job.Hits, h => Assert.Equal(1, h));
    }

    private sealed class CountingJob(int n) : ParallelJob
    {
        public int[] Hits { get; } = new int[n];
        public void Reset() => Array.Clear(Hits);
        public override void Execute(int chunk, int worker) => Interlocked.Increment(ref Hits[chunk]);
    }

    private sealed class ThrowingJob : ParallelJob
    {
        public override void Execute(int chunk, int worker)
        {
            if (chunk == 5) throw new InvalidOperationException("boom");
        }
    }
}

/// <summary>Tests that change the global SIMD policy must not run beside other kernel users.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class SimdPolicyCollection
{
    public const string Name = "SimdPolicy";
}
