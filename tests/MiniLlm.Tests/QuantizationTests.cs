using MiniLlm.Engine;
using MiniLlm.Kernels;

namespace MiniLlm.Tests;

/// <summary>Q8_0 weights: the kernels against dequantize-then-multiply, and the model's quality cost.</summary>
[Collection(SimdPolicyCollection.Name)]
public unsafe class QuantizationTests
{
    private static float[] Random(int n, int seed, float scale = 1)
    {
        var r = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => scale * (float)(r.NextDouble() * 2 - 1)).ToArray();
    }

    private static byte[] Quantize(float[] w, int rows, int k)
    {
        var q = new byte[rows * (k / Q8Load.Block) * Q8Load.BlockBytes];
        fixed (byte* p = q)
            for (int r = 0; r < rows; r++) Q8Load.QuantizeRow(w.AsSpan(r * k, k), p + r * (k / Q8Load.Block) * Q8Load.BlockBytes);
        return q;
    }

    [Fact]
    public void QuantizationErrorIsWithinHalfAStep()
    {
        const int K = 96;
        var w = Random(3 * K, 1, 2);
        w[5] = 0; w[40] = -2; // exact zero and the block maximum survive
        var q = Quantize(w, 3, K);
        fixed (byte* p = q)
            for (int r = 0; r < 3; r++)
                for (int k = 0; k < K; k++)
                {
                    nint row = (nint)(p + r * (K / 32) * Q8Load.BlockBytes);
                    float step = Q8Load.Scale(row, k);
                    Assert.True(Math.Abs(w[r * K + k] - Q8Load.Load1(row, k)) <= step * 0.5f + 1e-3f * step, $"row {r} k {k}");
                }
    }

    public static TheoryData<int, int, int> Shapes()
    {
        var d = new TheoryData<int, int, int>();
        foreach (int m in new[] { 1, 2, 3, 17, 64, 513 })
            foreach (var (k, n) in new[] { (32, 1), (96, 7), (160, 33), (256, 130) })
                d.Add(m, k, n);
        // batched-decode sizes with K over one K block of the skinny kernel
        foreach (int m in new[] { 5, 8, 9, 31 }) d.Add(m, 2112, 5);
        return d;
    }

    [Theory]
    [MemberData(nameof(Shapes))]
    public void Q8MatMulMatchesDequantizeThenMultiply(int M, int K, int N)
    {
        var x = Random(M * K, M + K);
        var w = Random(N * K, N);
        var q = Quantize(w, N, K);
        // reference: dequantize with the same rule, multiply in double
        var deq = new float[N * K];
        fixed (byte* p = q)
            for (int n = 0; n < N; n++)
                for (int k = 0; k < K; k++) deq[n * K + k] = Q8Load.Load1((nint)(p + n * (K / 32) * Q8Load.BlockBytes), k);
        var reference = new double[M * N];
        var bound = new double[M * N];
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++)
            {
                double s = 0, a = 0;
                for (int k = 0; k < K; k++) { s += (double)x[m * K + k] * deq[n * K + k]; a += Math.Abs((double)x[m * K + k] * deq[n * K + k]); }
                reference[m * N + n] = s;
                bound[m * N + n] = 1e-5 * a + 1e-6;
            }
        foreach (var isa in new[] { SimdPolicy.Isa.V512, SimdPolicy.Isa.V256, SimdPolicy.Isa.Scalar })
            foreach (int threads in new[] { 1, 3 })
            {
                SimdPolicy.Force(isa);
                try
                {
                    using var pool = new WorkerPool(threads);
                    var y = new float[M * N];
                    fixed (float* xp = x, yp = y)
                    fixed (byte* wp = q)
                        new MatMul(pool).Run(xp, M, new WeightMatrix((nint)wp, WeightType.Q8, N, K), yp);
                    for (int i = 0; i < y.Length; i++)
                        Assert.True(Math.Abs(y[i] - reference[i]) <= bound[i], $"{isa} threads={threads} M={M} K={K} N={N} at {i}: {y[i]} vs {reference[i]}");
                }
                finally { SimdPolicy.Reset(); }
            }
    }

    [Theory]
    [InlineData(32, 1)]
    [InlineData(96, 7)]
    [InlineData(288, 33)]
    [InlineData(2048, 130)]
    public void Q8GemvWithInt8ActivationsMatchesQuantizedReference(int K, int N)
    {
        if (!System.Runtime.Intrinsics.X86.AvxVnni.IsSupported) throw new InvalidOperationException("this test needs AVX-VNNI, which every machine of this project has");
        var x = Random(K, K, 3);
        var w = Random(N * K, N);
        var q = Quantize(w, N, K);
        // reference: x quantized per block of 32 by the same rule (scale max|x|/127, round to nearest), then exact products
        var xd = new double[K];
        for (int b = 0; b < K / 32; b++)
        {
            float amax = 0;
            for (int i = 0; i < 32; i++) amax = Math.Max(amax, Math.Abs(x[b * 32 + i]));
            float d = amax / 127f, inv = d == 0 ? 0 : 1 / d;
            for (int i = 0; i < 32; i++) xd[b * 32 + i] = (double)d * Math.Clamp((int)MathF.Round(x[b * 32 + i] * inv), -127, 127);
        }
        var y = new float[N];
        var yFp32 = new float[N];
        using var pool = new WorkerPool(2);
        var mm = new MatMul(pool);
        fixed (float* xp = x, yp = y, yf = yFp32)
        fixed (byte* wp = q)
        {
            var wm = new WeightMatrix((nint)wp, WeightType.Q8, N, K);
            mm.Q8Int8Activations = true;
            mm.Run(xp, 1, wm, yp);
            mm.Q8Int8Activations = false;
            mm.Run(xp, 1, wm, yf);
            for (int n = 0; n < N; n++)
            {
                double r = 0, a = 0;
                for (int k = 0; k < K; k++) { double t = Q8Load.Load1((nint)(wp + n * (K / 32) * Q8Load.BlockBytes), k) * xd[k]; r += t; a += Math.Abs(t); }
                Assert.True(Math.Abs(y[n] - r) <= 1e-5 * a + 1e-6, $"K={K} row {n}: {y[n]} vs {r}");
                // and it differs from the fp32-activation result only by x's quantization error (≤ half a step per element)
                Assert.True(Math.Abs(y[n] - yFp32[n]) <= 0.02 * a + 1e-4, $"K={K} row {n}: int8 {y[n]} vs fp32 {yFp32[n]}");
            }
        }
    }

    [Fact]
    public void PerplexityIsTheExponentOfTheMeanScoredNll()
    {
        var rm = new RandomModel(new RandomModelSpec { Vocab = 97, Context = 64 }, TestPaths.NewTempDir("ppl"));
        using var m = LlamaModel.Load(rm.Dir, threads: 2, maxTokens: 64);
        var rng = new Random(9);
        var tokens = Enumerable.Range(0, 130).Select(_ => rng.Next(3, 97)).ToArray();   // two windows of 64 and a remainder
        var res = Perplexity.Compute(m, tokens, 32);
        Assert.Equal(4, res.Chunks);
        Assert.Equal(4 * (32 - 1 - 16), res.ScoredTokens);
        // By hand, through the naive reference, window by window.
        var naive = new NaiveLlama(rm);
        double nll = 0;
        for (int c = 0; c < 4; c++)
        {
            var window = tokens.Skip(c * 32).Take(32).ToArray();
            window[0] = 1;
            var logits = naive.Logits(window);
            for (int j = 16; j < 31; j++)
            {
                double max = logits[j].Max();
                nll += max + Math.Log(logits[j].Sum(v => Math.Exp(v - max))) - logits[j][tokens[c * 32 + j + 1]];
            }
        }
        Assert.Equal(Math.Exp(nll / res.ScoredTokens), res.Perplexity, 3);
    }

    [Fact]
    public void Q8CostsLessThanOnePercentOfPerplexityOnTinyKjv()
    {
        var text = File.ReadAllText(Path.Combine(TestPaths.Shared, "data", "heldout.txt"));
        double Ppl(WeightFormat f)
        {
            using var m = LlamaModel.Load(TestPaths.Model("tiny-kjv"), threads: 2, maxTokens: 256, format: f);
            var tokens = m.Tokenizer.Encode(text)[..(12 * 256)];
            return Perplexity.Compute(m, tokens, 256).Perplexity;
        }
        double fp32 = Ppl(WeightFormat.Stored), q8 = Ppl(WeightFormat.Q8);
        Assert.InRange(fp32, 30, 200);   // the model card's held-out loss 4.24 ≈ perplexity 69; windows of 256 score less history
        Assert.True(Math.Abs(q8 / fp32 - 1) < 0.01, $"fp32 {fp32:F3}, q8 {q8:F3}");
    }

    [Fact]
    public void Q8ModelKeepsTheReferenceGreedyText()
    {
        using var q8 = LlamaModel.Load(TestPaths.Model("tiny-kjv"), threads: 2, format: WeightFormat.Q8);
        Assert.Equal(WeightFormat.Q8, q8.Format);
        Assert.True(q8.WeightBytes < 7 << 20, $"{q8.WeightBytes} bytes");   // 5.77 M weights × 36/32 ≈ 6.5 MB (vs 23 MB fp32)
        var r = new Generator(q8).Generate([1, 324, 434, 425], new GenerationOptions { MaxTokens = 8, Sampling = SamplingParams.Greedy });
        Assert.Equal([4003, 300, 538, 262, 384, 4007, 13, 1841], r.OutputIds);   // expected.json's first steps (margins ≥ 0.16)
    }

    [Fact]
    public void QuantizeWritesAModelThatLoadsAsQ8AndAgreesWithLoadTimeQuantization()
    {
        var dir = TestPaths.NewTempDir("q8-export");
        var o = new StringWriter();
        var e = new StringWriter();
        Assert.True(MiniLlm.Cli.CliApp.Run(["quantize", "--out", dir], o, e) == 0, e.ToString());
        using var saved = LlamaModel.Load(dir);
        using var atLoad = LlamaModel.Load(TestPaths.Model("tiny-kjv"), format: WeightFormat.Q8);
        Assert.Equal(WeightFormat.Q8, saved.Format);
        Assert.Equal(atLoad.WeightBytes, saved.WeightBytes);
        var V = saved.Config.VocabSize;
        var a = new float[V];
        var b = new float[V];
        int[] prompt = [1, 324, 434, 425, 13, 262];
        using (var c1 = saved.NewKvCache()) saved.Forward(prompt, 0, c1, a);
        using (var c2 = atLoad.NewKvCache()) atLoad.Forward(prompt, 0, c2, b);
        Assert.Equal(b, a);   // the same bytes, the same kernels
        var info = new StringWriter();
        MiniLlm.Cli.CliApp.Run(["info", "--model", dir], info, new StringWriter());
        Assert.Contains("5,770,496", info.ToString());
    }

    [Fact]
    public void U8TensorsOutsideAQ8ExportAreRefused()
    {
        var dir = TestPaths.NewTempDir("u8");
        var rm = new RandomModel(new RandomModelSpec { Hidden = 32, Intermediate = 64, Heads = 2, KvHeads = 1, HeadDim = 16, Vocab = 40, Layers = 1 }, dir);
        var entries = rm.Tensors.Select(kv => kv.Key == "model.layers.0.mlp.up_proj.weight"
            ? new TestSafetensors.Entry(kv.Key, "U8", [64, 36], new byte[64 * 36])
            : TestSafetensors.F32(kv.Key, kv.Value.Shape, kv.Value.Values)).ToList();
        TestSafetensors.Write(Path.Combine(dir, "model.safetensors"), entries);
        var ex = Assert.Throws<MiniLlm.Loader.ModelFormatException>(() => LlamaModel.Load(dir));
        Assert.Contains("up_proj", ex.Message);
        Assert.Contains("U8", ex.Message);
    }
}
