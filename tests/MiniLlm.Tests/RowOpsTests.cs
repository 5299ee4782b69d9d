using MiniLlm.Engine;
using MiniLlm.Kernels;

namespace MiniLlm.Tests;

/// <summary>The elementwise ops spread over the pool give the caller-alone results bit for bit.</summary>
public unsafe class RowOpsTests
{
    private static float[] Random(int n, int seed)
    {
        var r = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = (float)(r.NextDouble() * 4 - 2);
        return a;
    }

    [Theory]
    [InlineData(3, 256, 2)]       // under the threshold: the caller alone
    [InlineData(300, 257, 2)]     // rows cut unevenly, n not a multiple of the vector width
    [InlineData(97, 768, 3)]      // three threads
    public void RmsNormMatchesTheSerialOp(int rows, int n, int threads)
    {
        var x = Random(rows * n, rows + n);
        var w = Random(n, 7);
        var serial = new float[rows * n];
        var spread = new float[rows * n];
        using var pool = new WorkerPool(threads);
        var ops = new RowOps(pool);
        fixed (float* xp = x, wp = w, s = serial, p = spread)
        {
            Ops.RmsNorm(xp, wp, s, rows, n, 1e-5f);
            ops.RmsNorm(xp, wp, p, rows, n, 1e-5f);
        }
        Assert.Equal(serial, spread);
        Assert.Contains(spread, v => v != 0);
    }

    [Theory]
    [InlineData(1000, 2)]
    [InlineData(65536 + 17, 2)]   // over the threshold, a tail past the vector width
    [InlineData(200003, 3)]
    public void AddAndSwiGluMatchTheSerialOps(int n, int threads)
    {
        var a = Random(n, n);
        var b = Random(n, n + 1);
        using var pool = new WorkerPool(threads);
        var ops = new RowOps(pool);
        var addSerial = (float[])a.Clone();
        var addSpread = (float[])a.Clone();
        var gluSerial = (float[])a.Clone();
        var gluSpread = (float[])a.Clone();
        fixed (float* bp = b, s1 = addSerial, p1 = addSpread, s2 = gluSerial, p2 = gluSpread)
        {
            Ops.AddInPlace(s1, bp, n);
            ops.AddInPlace(p1, bp, n);
            Ops.SwiGlu(s2, bp, n);
            ops.SwiGlu(p2, bp, n);
        }
        Assert.Equal(addSerial, addSpread);
        Assert.Equal(gluSerial, gluSpread);
        Assert.NotEqual(a, gluSpread);
    }
}
