using System.Diagnostics;
using System.Runtime.InteropServices;
using MiniLlm.Kernels;

namespace MiniLlm.Engine;

/// <summary>One kernel measurement: the median over repetitions, as FLOP/s and weight bytes/s.</summary>
/// <param name="ProbeGBps">For the streaming kernels: the read-bandwidth probe timed between the kernel's own
/// repetitions (median), the ceiling of the same minute on a host whose bandwidth drifts; 0 where not taken.</param>
public sealed record KernelResult(string Kernel, string Type, int M, int K, int N, double MedianSeconds, double Flops, double WeightBytes, double ProbeGBps = 0)
{
    public double Gflops => Flops / MedianSeconds / 1e9;
    public double GBps => WeightBytes / MedianSeconds / 1e9;
}

/// <summary>
/// The kernels alone, on buffers the same run allocates: GEMM at prefill sizes (weights reused from cache, so
/// compute-bound) and GEMV over ≥ 256 MiB of weights spread across several matrices (so every byte comes from DRAM).
/// </summary>
public static unsafe class KernelBenchmark
{
    public static IEnumerable<KernelResult> Run(int threads, int reps, Action<string>? progress = null)
    {
        using var pool = new WorkerPool(threads);
        var mm = new MatMul(pool);
        foreach (var (k, n) in new[] { (768, 768), (768, 2048), (2048, 768), (2048, 8192) })
            foreach (var t in new[] { WeightType.F32, WeightType.BF16 })
            {
                progress?.Invoke($"GEMM {t} 512×{k}×{n}");
                yield return Measure(pool, mm, "gemm", t, 512, k, n, copies: 1, reps, probe: null);
            }
        // The probe reads as many bytes as the kernels do, on the same kind of pages, once before every repetition.
        using var probe = new Ceilings.ReadProbe(threads, 256L << 20);
        foreach (var t in new[] { WeightType.F32, WeightType.BF16 })
            foreach (int m in new[] { 1, 8 })
            {
                // 4096 × 4096 matrices, enough of them for 256 MiB of weights
                int es = t == WeightType.F32 ? 4 : 2;
                int copies = (int)((256L << 20) / (4096L * 4096 * es));
                progress?.Invoke($"{(m == 1 ? "GEMV" : "skinny GEMM")} {t} M={m}, {copies} × 4096×4096");
                yield return Measure(pool, mm, m == 1 ? "gemv" : "gemm-skinny", t, m, 4096, 4096, copies, reps, probe);
            }
    }

    private static KernelResult Measure(WorkerPool pool, MatMul mm, string name, WeightType t, int M, int K, int N, int copies, int reps, Ceilings.ReadProbe? probe)
    {
        int es = t == WeightType.F32 ? 4 : 2;
        long wBytes = (long)N * K * es;
        var ws = new nint[copies];
        float* x = (float*)NativeMemory.AlignedAlloc((nuint)((long)M * K * 4), 64);
        float* y = (float*)NativeMemory.AlignedAlloc((nuint)((long)M * N * 4), 64);
        try
        {
            var rng = new Random(1);
            for (int c = 0; c < copies; c++)
            {
                ws[c] = (nint)LargePages.Alloc((nuint)wBytes);   // as the model holds its weights
                var u = new Span<ushort>((void*)ws[c], (int)(wBytes / 2));
                for (int i = 0; i < u.Length; i++) u[i] = (ushort)(0x3c00 + rng.Next(512));  // small finite values in every dtype
            }
            for (long i = 0; i < (long)M * K; i++) x[i] = (float)rng.NextDouble();
            var times = new List<double>();
            var probes = new List<double>();
            for (int r = -1; r < reps; r++)
            {
                if (probe != null && r >= 0) probes.Add(probe.Measure(pool));
                var sw = Stopwatch.StartNew();
                for (int c = 0; c < copies; c++) mm.Run(x, M, new WeightMatrix(ws[c], t, N, K), y);
                if (r >= 0) times.Add(sw.Elapsed.TotalSeconds);
            }
            times.Sort();
            probes.Sort();
            double median = times[times.Count / 2];
            double probeMedian = probes.Count > 0 ? probes[probes.Count / 2] : 0;
            return new KernelResult(name, t.ToString(), M, K, N, median, 2.0 * M * N * K * copies, (double)wBytes * copies, probeMedian);
        }
        finally
        {
            foreach (var w in ws) LargePages.Free((void*)w);
            NativeMemory.AlignedFree(x);
            NativeMemory.AlignedFree(y);
        }
    }
}
