using MiniLlm.Engine;
using MiniLlm.Kernels;
using MiniLlm.Loader;

namespace MiniLlm.Tests;

/// <summary>The bf16 GEMV's prefetch distance: it moves no bits, and a model from DRAM measures its own.</summary>
public unsafe class GemvPrefetchTests
{
    /// <summary>
    /// The four-row bf16 GEMV (weights from DRAM) gives the same bits at every prefetch distance, none included, on
    /// one and two threads, and stays within the naive bound; rows of 8 KiB and more keep their own distance.
    /// </summary>
    [Theory]
    [InlineData(768, 200)]     // short rows, four-row groups and a tail of rows
    [InlineData(2048, 131)]
    [InlineData(4096, 64)]     // long rows: their own distance, the setting unused
    public void DistanceChangesNoBits(int K, int N)
    {
        var rng = new Random(K + N);
        var x = new float[K];
        for (int i = 0; i < K; i++) x[i] = (float)(rng.NextDouble() * 2 - 1);
        var w = new ushort[N * K];
        for (int i = 0; i < w.Length; i++) w[i] = Bf16.FromFloat((float)(rng.NextDouble() * 2 - 1));
        foreach (int threads in new[] { 1, 2 })
        {
            using var pool = new WorkerPool(threads);
            var mm = new MatMul(pool) { CacheResidentWeights = false };
            float[]? first = null;
            foreach (int distance in new[] { 0, 1024, 1536, 2048, 4096 })
            {
                mm.Bf16GemvPrefetchBytes = distance;
                var y = new float[N];
                fixed (float* xp = x, yp = y)
                fixed (ushort* wp = w)
                    mm.Run(xp, 1, new WeightMatrix((nint)wp, WeightType.BF16, N, K), yp);
                if (first == null)
                {
                    first = y;
                    for (int n = 0; n < N; n++)
                    {
                        double s = 0, a = 0;
                        for (int k = 0; k < K; k++) { double p = (double)x[k] * Bf16.ToFloat(w[n * K + k]); s += p; a += Math.Abs(p); }
                        Assert.True(Math.Abs(y[n] - s) <= 1e-5 * a + 1e-6, $"K={K} threads={threads} row {n}: {y[n]} vs {s}");
                    }
                }
                else Assert.True(first.AsSpan().SequenceEqual(y), $"K={K} threads={threads}: distance {distance} changed the output");
            }
        }
    }

    [Theory]
    [InlineData(-64)]
    [InlineData(100)]
    public void DistanceMustBeWholeLines(int distance)
    {
        using var pool = new WorkerPool(1);
        var mm = new MatMul(pool);
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => mm.Bf16GemvPrefetchBytes = distance);
        Assert.Contains("multiple of 64", e.Message);
    }

    /// <summary>
    /// A bf16 model larger than the last-level cache times decode steps at each candidate and keeps the fastest; a
    /// model that fits in the cache (whose GEMV does not prefetch) and an fp32 one are not tuned.
    /// </summary>
    [Fact]
    public void ModelFromDramTunesItsOwnDistance()
    {
        var shape = new ModelShape("dram-bf16", 1024, 2816, 2, 8, 8, 4096, 256, false);
        string dir = TestPaths.NewTempDir("prefetch-tune");
        try
        {
            SyntheticModel.Write(shape, DType.BF16, dir, seed: 3);
            using var model = LlamaModel.Load(dir, threads: 2);
            var tuning = model.TuneGemvPrefetch(rounds: 3);
            if (model.WeightBytes < Ceilings.LastLevelCacheBytes)
            {
                Assert.Null(tuning);   // a host whose last-level cache holds these 58 MiB
                return;
            }
            Assert.NotNull(tuning);
            Assert.Equal(MatMul.Bf16GemvPrefetchCandidates.ToArray(), tuning.Candidates);
            Assert.All(tuning.MedianSeconds, s => Assert.True(s > 0));
            Assert.Equal(tuning.Candidates[Array.IndexOf(tuning.MedianSeconds, tuning.MedianSeconds.Min())], tuning.Bytes);
            Assert.Equal(tuning.Bytes, model.Bf16GemvPrefetchBytes);
            Assert.Same(tuning, model.GemvPrefetch);   // what profile and bench print
            Assert.Contains($"{tuning.Bytes} B ahead", tuning.ToString());
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public void CacheResidentAndFp32ModelsAreNotTuned()
    {
        foreach (var dtype in new[] { DType.BF16, DType.F32 })
        {
            // fp32 at 66 MiB: from DRAM on these hosts, but no bf16 GEMV to tune
            var shape = dtype == DType.BF16 ? new ModelShape("small-bf16", 64, 128, 1, 4, 2, 4096, 128, true) : new ModelShape("dram-f32", 1024, 2816, 1, 8, 8, 4096, 256, false);
            string dir = TestPaths.NewTempDir("prefetch-no-tune");
            try
            {
                SyntheticModel.Write(shape, dtype, dir, seed: 4);
                using var model = LlamaModel.Load(dir, threads: 2);
                int before = model.Bf16GemvPrefetchBytes;
                Assert.Null(model.TuneGemvPrefetch(rounds: 3));
                Assert.Null(model.GemvPrefetch);
                Assert.Equal(before, model.Bf16GemvPrefetchBytes);
            }
            finally { Directory.Delete(dir, recursive: true); }
        }
    }
}
