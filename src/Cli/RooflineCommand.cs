using System.CommandLine;
using MiniLlm.Kernels;

namespace MiniLlm.Cli;

/// <summary><c>minillm roofline</c>: measure this machine's FMA peak and read bandwidth and save them for other commands.</summary>
public static class RooflineCommand
{
    public static Command Create(CliIO io)
    {
        var threads = CommonOptions.Threads();
        var reps = new Option<int>("--reps", "-r") { Description = "Repetitions per measurement (the median is kept)", DefaultValueFactory = _ => 5 };
        var outPath = new Option<string?>("--out") { Description = $"Where to save the JSON (default {Roofline.DefaultPath})" };
        var output = CommonOptions.Output();
        var cmd = new Command("roofline", "Measure peak FMA throughput and read bandwidth (DRAM and each cache level)") { threads, reps, outPath, output };
        cmd.SetAction(r =>
        {
            int t = ResolveThreads(r.GetValue(threads));
            int n = r.GetValue(reps);
            if (n < 1) throw new ArgumentException($"reps must be ≥ 1, got {n}", "reps");
            var roof = Ceilings.Measure(t, n, r.GetValue(output) == "json" ? null : s => io.Err.WriteLine($"measuring {s}…"));
            string path = r.GetValue(outPath) ?? Roofline.DefaultPath;
            roof.Save(path);
            if (r.GetValue(output) == "json") io.Out.WriteLine(File.ReadAllText(path));
            else Print(io.Out, roof, path);
            return ExitCodes.Ok;
        });
        return cmd;
    }

    /// <summary>Ceilings from a saved file (--roofline), or measured now with <paramref name="reps"/> repetitions.</summary>
    public static Roofline LoadOrMeasure(string? file, int threads, int reps, TextWriter? progress)
    {
        if (file != null)
            return Roofline.TryLoad(file) ?? throw new ArgumentException($"{file}: not a roofline JSON (make one with `minillm roofline --out {file}`)", "roofline");
        progress?.WriteLine("measuring ceilings (FMA peak, DRAM and cache read bandwidth)…");
        return Ceilings.Measure(threads, reps);
    }

    public static int ResolveThreads(int t) => t < 0
        ? throw new ArgumentException($"threads must be ≥ 0 (0 = one per core), got {t}", "threads")
        : t == 0 ? WorkerPool.DefaultThreads : t;

    public static void Print(TextWriter w, Roofline r, string? path)
    {
        w.WriteLine($"CPU: {r.Cpu}, {r.Threads} threads, {r.Isa}");
        w.WriteLine($"peak fp32 FMA:        {r.PeakGflops,8:F1} GFLOP/s");
        w.WriteLine($"DRAM read bandwidth:  {r.BandwidthGBps,8:F1} GB/s   ({r.DramBufferBytes >> 20} MiB buffer, median of {r.Reps})");
        foreach (var p in r.CacheBandwidth)
            w.WriteLine($"{p.Level} read bandwidth:    {p.GBps,8:F1} GB/s   ({p.WorkingSetBytes >> 10} KiB working set)");
        w.WriteLine($"ridge point:          {r.Ridge,8:F2} FLOP/byte  (below: memory-bound; above: compute-bound)");
        w.WriteLine("caches: " + string.Join(", ", r.Caches.Select(c => $"{c.Name} {c.Bytes >> 10} KiB ({c.Source})")));
        if (path != null) w.WriteLine($"saved to {path}");
    }
}
