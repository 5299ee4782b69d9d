using MiniLlm.Kernels;
using MiniLlm.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace MiniLlm.ReferenceTests;

/// <summary>Each kernel against its torch counterpart on random inputs.</summary>
public unsafe class KernelsVsTorchTests
{
    public KernelsVsTorchTests() => TorchCheck.Ensure();

    private static float[] Random(int n, int seed, float scale = 1)
    {
        var r = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => scale * (float)(r.NextDouble() * 2 - 1)).ToArray();
    }

    private static float[] Data(Tensor t) => t.contiguous().data<float>().ToArray();

    private static void Close(float[] expected, float[] actual, double relative, string what)
    {
        double scale = Math.Max(1e-6, expected.Max(MathF.Abs)), worst = 0;
        for (int i = 0; i < expected.Length; i++) worst = Math.Max(worst, Math.Abs(expected[i] - actual[i]));
        Assert.True(worst <= relative * scale, $"{what}: max abs error {worst:E3} vs {relative * scale:E3}");
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(17)]
    [InlineData(64)]
    [InlineData(513)]
    public void MatMulMatchesTorchMatmul(int M)
    {
        const int K = 257, N = 130;
        var x = Random(M * K, M);
        foreach (var (dtype, type) in new[] { ("F32", WeightType.F32), ("BF16", WeightType.BF16), ("F16", WeightType.F16) })
        {
            var w = Random(N * K, N + M).Select(v => TestSafetensors.RoundTo(v, dtype)).ToArray();
            var stored = TestSafetensors.Typed("w", [N, K], w, dtype).Data;
            using var scope = torch.NewDisposeScope();
            var expected = Data(torch.tensor(x, [M, K]).matmul(torch.tensor(w, [N, K]).t()));
            using var pool = new WorkerPool(2);
            var y = new float[M * N];
            fixed (float* xp = x, yp = y)
            fixed (byte* wp = stored)
                new MatMul(pool).Run(xp, M, new WeightMatrix((nint)wp, type, N, K), yp);
            Close(expected, y, 1e-5, $"{dtype} M={M}");
        }
    }

    [Fact]
    public void RmsNormSoftmaxRopeMatchTorch()
    {
        using var scope = torch.NewDisposeScope();
        const int rows = 5, n = 77, hd = 64, heads = 3;
        var x = Random(rows * n, 1, 4);
        var w = Random(n, 2);
        var y = new float[rows * n];
        fixed (float* xp = x, wp = w, yp = y) Ops.RmsNorm(xp, wp, yp, rows, n, 1e-5f);
        var tx = torch.tensor(x, [rows, n]);
        Close(Data(torch.tensor(w) * (tx * torch.rsqrt(tx.pow(2).mean([-1], keepdim: true) + 1e-5))), y, 1e-5, "rmsnorm");

        var s = Random(301, 3, 30);
        var sm = (float[])s.Clone();
        fixed (float* p = sm) Ops.Softmax(p, sm.Length);
        Close(Data(torch.tensor(s).softmax(0)), sm, 1e-5, "softmax");

        var q = Random(heads * hd, 4);
        var rq = (float[])q.Clone();
        const int pos = 37;
        fixed (float* p = rq) new RopeTable(hd, 64, 10000, null).Apply(p, heads, pos);
        var inv = 1.0 / torch.pow(10000.0, torch.arange(0, hd, 2, dtype: ScalarType.Int64).to_type(ScalarType.Float32) / hd);
        var emb = torch.cat([inv * pos, inv * pos], -1);
        var tq = torch.tensor(q, [heads, hd]);
        var rot = torch.cat([-tq.narrow(-1, hd / 2, hd / 2), tq.narrow(-1, 0, hd / 2)], -1);
        Close(Data(tq * emb.cos() + rot * emb.sin()), rq, 1e-5, "rope");
    }

    [Theory]
    [InlineData(1, 37, 8, 2, 64)]
    [InlineData(5, 23, 6, 3, 32)]
    public void AttentionOverAPagedCacheMatchesTorch(int S, int start, int H, int G, int hd)
    {
        using var scope = torch.NewDisposeScope();
        int ctx = start + S, kvd = G * hd, tiles = (ctx + KvView.Tile - 1) / KvView.Tile;
        var q = Random(S * H * hd, S);
        var k = Random(ctx * kvd, ctx);
        var v = Random(ctx * kvd, ctx + 1);
        var table = Enumerable.Range(0, tiles).Reverse().ToArray();
        var kPool = new float[tiles * KvView.Tile * kvd];
        var vPool = new float[tiles * KvView.Tile * kvd];
        var o = new float[S * H * hd];
        using var pool = new WorkerPool(2);
        fixed (float* qp = q, kp = k, vp = v, op = o, kpp = kPool, vpp = vPool)
        fixed (int* tp = table)
        {
            var view = new KvView(kpp, vpp, kvd, tp);
            view.WriteRows(0, ctx, kp, vp);
            new Attention(pool, 128).Run(qp, S, start, H, G, hd, view, op);
        }
        // torch: q [H, S, hd] against all ctx keys with the causal offset mask, keys repeated per group
        var tq = torch.tensor(q, [S, H, hd]).transpose(0, 1);
        var tk = torch.tensor(k, [ctx, G, hd]).transpose(0, 1).repeat_interleave(H / G, 0);
        var tv = torch.tensor(v, [ctx, G, hd]).transpose(0, 1).repeat_interleave(H / G, 0);
        var scores = tq.matmul(tk.transpose(1, 2)) / Math.Sqrt(hd);
        var mask = torch.ones(S, ctx, dtype: ScalarType.Bool).triu(start + 1);
        var expected = scores.masked_fill(mask, float.NegativeInfinity).softmax(-1).matmul(tv).transpose(0, 1);
        Close(Data(expected), o, 1e-5, $"attention S={S} over {ctx} positions");
    }
}
