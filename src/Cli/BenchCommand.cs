using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using MiniLlm.Engine;
using MiniLlm.Kernels;
using MiniLlm.Loader;

namespace MiniLlm.Cli;

/// <summary><c>minillm bench</c>: llama-bench's pp/tg tests, each against the roofs measured in the same run.</summary>
public static class BenchCommand
{
    public static Command Create(CliIO io)
    {
        var model = CommonOptions.Model();
        var prompts = new Option<string>("-p", "--prompt-tokens") { Description = "Prefill lengths, comma-separated (0 to skip)", DefaultValueFactory = _ => "512" };
        var gens = new Option<string>("-n", "--gen-tokens") { Description = "Generation lengths, comma-separated (0 to skip)", DefaultValueFactory = _ => "128" };
        var batches = new Option<string>("-b", "--batch") { Description = "Decode batch sizes, comma-separated", DefaultValueFactory = _ => "1" };
        var reps = new Option<int>("-r", "--reps") { Description = "Repetitions of each test", DefaultValueFactory = _ => 3 };
        var threads = CommonOptions.Threads();
        var roofFile = new Option<string?>("--roofline") { Description = "Use saved ceilings from this JSON instead of measuring them now" };
        var output = new Option<string>("--output", "-o") { Description = "Output format", DefaultValueFactory = _ => "text" }.AcceptOnlyFromAmong("text", "json", "csv", "md");
        var sweep = new Option<string?>("--batch-sweep") { Description = "Decode throughput per batch size, e.g. 1,2,4,8,16,32,64 (skips prefill)" };
        var weightsOpt = CommonOptions.Weights();
        var mmap = CommonOptions.Mmap();
        var q8Act = CommonOptions.Q8Activations();
        var plot = new Option<string?>("--plot") { Description = "With --batch-sweep: write batch-sweep.png/.svg into this directory" };
        var kernels = new Option<bool>("--kernels") { Description = "Benchmark the GEMM/GEMV kernels alone (no model) against the ceilings" };
        var kvDtype = CommonOptions.KvDtype();
        var cmd = new Command("bench", "Benchmark prefill (ppN) and decode (tgN, batch B) against this machine's measured roofs")
        {
            model, prompts, gens, batches, reps, threads, roofFile, output, kernels, sweep, plot, weightsOpt, mmap, q8Act, kvDtype,
        };
        cmd.SetAction(r =>
        {
            int[] ps = ParseList(r.GetValue(prompts)!, "p"), ns = ParseList(r.GetValue(gens)!, "n"), bs = ParseList(r.GetValue(batches)!, "b");
            if (r.GetValue(sweep) is { } sw)
            {
                bs = ParseList(sw, "batch-sweep");
                ps = [];
            }
            int rp = r.GetValue(reps);
            if (rp < 1) throw new ArgumentException($"reps must be ≥ 1, got {rp}", "reps");
            if (bs.Any(b => b < 1)) throw new ArgumentException("batch sizes must be ≥ 1", "batch");
            int t = RooflineCommand.ResolveThreads(r.GetValue(threads));
            string fmt = r.GetValue(output)!;
            if (r.GetValue(kernels))
            {
                var kroof = RooflineCommand.LoadOrMeasure(r.GetValue(roofFile), t, 5, fmt == "text" ? io.Err : null);
                var kr = KernelBenchmark.Run(t, Math.Max(rp, 3), fmt == "text" ? s => io.Err.WriteLine($"running {s}…") : null).ToList();
                io.Out.Write(KernelTable(kr, kroof, t, fmt));
                return ExitCodes.Ok;
            }
            var dir = ModelLocator.Resolve(r.GetValue(model));
            using var llm = LlamaModel.Load(dir, t, maxTokens: Math.Max(512, Math.Max(ps.DefaultIfEmpty(0).Max(), bs.Max())), format: CommonOptions.Format(r.GetValue(weightsOpt)!), mapWeights: r.GetValue(mmap));
            llm.Q8Int8Activations = r.GetValue(q8Act) == "int8";
            var kv = CommonOptions.KvType(r.GetValue(kvDtype)!);

            var roof = RooflineCommand.LoadOrMeasure(r.GetValue(roofFile), t, 5, fmt == "text" ? io.Err : null);
            // the decode configuration `generate` runs with (it tunes at warm-up): a bf16 model from DRAM times its GEMV's prefetch distance
            var tuning = llm.TuneGemvPrefetch();

            var results = new List<BenchResult>();
            // Beside every decode repetition, the read probe on the model's threads: the bandwidth of that minute.
            using var probe = ns.Any(n => n > 0) ? new Ceilings.ReadProbe(t, 256L << 20) : null;
            foreach (int p in ps.Where(p => p > 0))
            {
                if (fmt == "text") io.Err.WriteLine($"running pp{p}…");
                results.Add(Benchmark.Prefill(llm, p, rp, kv));
            }
            foreach (int n in ns.Where(n => n > 0))
                foreach (int b in bs)
                {
                    if (fmt == "text") io.Err.WriteLine($"running tg{n} batch {b}…");
                    results.Add(Benchmark.Generate(llm, n, b, rp, probe, kv));
                }
            var info = new BenchInfo(Path.GetFileName(dir.TrimEnd('/')), llm.WeightLabel, llm.WeightBytes, t, roof, kv, tuning);
            if (r.GetValue(plot) is { } plotDir)
            {
                Plots.BatchSweep(plotDir, "batch-sweep", results.Where(x => x.Test.StartsWith("tg", StringComparison.Ordinal)).ToList(), roof, $"{info.Model} ({info.DType})");
                if (fmt == "text") io.Err.WriteLine($"plot written to {Path.GetFullPath(plotDir)}");
            }
            io.Out.Write(fmt switch
            {
                "json" => Json(info, results),
                "csv" => Csv(info, results),
                "md" => Table(info, results, markdown: true),
                _ => Table(info, results, markdown: false),
            });
            return ExitCodes.Ok;
        });
        return cmd;
    }

    private static string KernelTable(List<KernelResult> rs, Roofline roof, int threads, string fmt)
    {
        if (fmt == "json")
            return JsonSerializer.Serialize(new
            {
                threads, ceilings = new { peak_gflops = roof.PeakGflops, bandwidth_gbps = roof.BandwidthGBps },
                results = rs.Select(r => new
                {
                    kernel = r.Kernel, type = r.Type, m = r.M, k = r.K, n = r.N, seconds = r.MedianSeconds, gflops = r.Gflops, gbps = r.GBps,
                    pct_fma_peak = 100 * r.Gflops / roof.PeakGflops, pct_bandwidth = 100 * r.GBps / roof.BandwidthGBps,
                    probe_gbps = r.ProbeGBps > 0 ? r.ProbeGBps : (double?)null,
                    pct_probe = r.ProbeGBps > 0 ? 100 * r.GBps / r.ProbeGBps : (double?)null,
                }),
            }, new JsonSerializerOptions { WriteIndented = true }) + "\n";
        var sb = new StringBuilder();
        sb.AppendLine($"kernels alone, {threads} threads; ceilings: FMA peak {F(roof.PeakGflops)} GFLOP/s, DRAM read {F(roof.BandwidthGBps)} GB/s");
        sb.AppendLine("streaming kernels also time the read probe (256 MiB, 2 MiB pages) before each repetition: 'probe GB/s' is its median, '% probe' the kernel against it");
        bool md = fmt == "md";
        if (md) sb.AppendLine().AppendLine("| kernel | type | M×K×N | GFLOP/s | % FMA peak | weight GB/s | % DRAM BW | probe GB/s | % probe |").AppendLine("|---|---|---|---:|---:|---:|---:|---:|---:|");
        foreach (var r in rs)
        {
            string probe = r.ProbeGBps > 0 ? F(r.ProbeGBps) : "-", pct = r.ProbeGBps > 0 ? F(100 * r.GBps / r.ProbeGBps) : "-";
            string[] c = [r.Kernel, r.Type, $"{r.M}×{r.K}×{r.N}", F(r.Gflops), F(100 * r.Gflops / roof.PeakGflops), F(r.GBps), F(100 * r.GBps / roof.BandwidthGBps), probe, pct];
            sb.AppendLine(md ? "| " + string.Join(" | ", c) + " |"
                : $"{c[0],-12} {c[1],-5} {c[2],-16} {c[3],9} GFLOP/s {c[4],6} % peak {c[5],8} GB/s {c[6],6} % BW {c[7],7} probe {c[8],6} % probe");
        }
        return sb.ToString();
    }

    private sealed record BenchInfo(string Model, string DType, long WeightBytes, int Threads, Roofline Roof, KvType Kv, GemvPrefetchTuning? Tuning);

    private static int[] ParseList(string s, string name)
    {
        try { return s.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(x => int.Parse(x, CultureInfo.InvariantCulture)).ToArray(); }
        catch (FormatException) { throw new ArgumentException($"-{name} expects comma-separated integers, got '{s}'", name); }
    }

    private static string F(double v, string f = "F1") => v.ToString(f, CultureInfo.InvariantCulture);

    private static string Table(BenchInfo i, List<BenchResult> rs, bool markdown)
    {
        var sb = new StringBuilder();
        var roof = i.Roof;
        sb.AppendLine($"model {i.Model} ({i.DType}, {i.WeightBytes / 1048576.0:F1} MiB of weights, KV cache {CommonOptions.KvName(i.Kv)}), {i.Threads} threads, {roof.Cpu}");
        sb.AppendLine($"ceilings measured {(roof.MeasuredUtc > DateTime.UtcNow.AddMinutes(-10) ? "in this run" : "at " + roof.MeasuredUtc.ToString("u"))}: " +
                      $"FMA peak {F(roof.PeakGflops)} GFLOP/s, DRAM read {F(roof.BandwidthGBps)} GB/s, ridge {F(roof.Ridge, "F2")} FLOP/byte");
        if (i.Tuning is { } tuned) sb.AppendLine($"tuned before the runs: {tuned}");
        if (i.WeightBytes < roof.LastLevelCacheBytes)
            sb.AppendLine($"note: the weights ({i.WeightBytes / 1048576.0:F1} MiB) fit in the last-level cache, so decode reads them from cache, not DRAM: %BW can exceed 100 %.");
        if (rs.Any(r => r.ProbeMedianGBps > 0))
            sb.AppendLine("decode rows also time the read probe (256 MiB) on the model's threads before each repetition: 'probe GB/s' (median) and the roof it gives, 'probe roof'");
        string[] head = ["test", "tok/s", "±sd", "ms/step", "FLOP/byte", "GFLOP/s", "% FMA peak", "GB/s", "% DRAM BW", "roof tok/s", "% of roof", "probe GB/s", "% of probe roof"];
        var rows = rs.Select(r => new[]
        {
            r.Test, F(r.MeanTokensPerSecond), F(r.SdTokensPerSecond), F(1000 * r.Batch / r.MeanTokensPerSecond, "F2"), F(r.Flops / r.Bytes, "F2"),
            F(r.Gflops), F(100 * r.Gflops / roof.PeakGflops),
            F(r.GBps), F(100 * r.GBps / roof.BandwidthGBps), F(r.BoundTokensPerSecond(roof)), F(100 * r.MeanTokensPerSecond / r.BoundTokensPerSecond(roof)),
            r.ProbeMedianGBps > 0 ? F(r.ProbeMedianGBps) : "-", r.ProbeMedianGBps > 0 ? F(100 * r.MeanTokensPerSecond / r.ProbeBoundTokensPerSecond(roof)) : "-",
        }).ToList();
        var widths = head.Select((h, c) => Math.Max(h.Length, rows.Select(x => x[c].Length).DefaultIfEmpty(0).Max())).ToArray();
        string Line(string[] cells) => markdown
            ? "| " + string.Join(" | ", cells.Select((x, c) => c == 0 ? x.PadRight(widths[c]) : x.PadLeft(widths[c]))) + " |"
            : string.Join("  ", cells.Select((x, c) => c == 0 ? x.PadRight(widths[c]) : x.PadLeft(widths[c])));
        if (markdown) sb.AppendLine();
        sb.AppendLine(Line(head));
        sb.AppendLine(markdown ? "|" + string.Join("|", widths.Select((w, c) => c == 0 ? new string('-', w + 2) : new string('-', w + 1) + ":")) + "|" : new string('-', widths.Sum() + 2 * (widths.Length - 1)));
        foreach (var row in rows) sb.AppendLine(Line(row));
        return sb.ToString();
    }

    private static string Csv(BenchInfo i, List<BenchResult> rs)
    {
        var sb = new StringBuilder("model,dtype,threads,test,batch,tok_s,sd,gflops,pct_fma_peak,gbps,pct_bw,roof_tok_s,pct_roof,peak_gflops,bw_gbps,probe_gbps,probe_roof_tok_s,pct_probe_roof,kv_dtype\n");
        foreach (var r in rs)
            sb.AppendLine(string.Join(",", i.Model, i.DType, i.Threads, r.Test, r.Batch, F(r.MeanTokensPerSecond, "F2"), F(r.SdTokensPerSecond, "F2"),
                F(r.Gflops, "F2"), F(100 * r.Gflops / i.Roof.PeakGflops, "F2"), F(r.GBps, "F2"), F(100 * r.GBps / i.Roof.BandwidthGBps, "F2"),
                F(r.BoundTokensPerSecond(i.Roof), "F2"), F(100 * r.MeanTokensPerSecond / r.BoundTokensPerSecond(i.Roof), "F2"), F(i.Roof.PeakGflops, "F2"), F(i.Roof.BandwidthGBps, "F2"),
                r.ProbeMedianGBps > 0 ? F(r.ProbeMedianGBps, "F2") : "", r.ProbeMedianGBps > 0 ? F(r.ProbeBoundTokensPerSecond(i.Roof), "F2") : "",
                r.ProbeMedianGBps > 0 ? F(100 * r.MeanTokensPerSecond / r.ProbeBoundTokensPerSecond(i.Roof), "F2") : "", CommonOptions.KvName(i.Kv)));
        return sb.ToString();
    }

    private static string Json(BenchInfo i, List<BenchResult> rs)
    {
        var o = new
        {
            model = i.Model, dtype = i.DType, weight_bytes = i.WeightBytes, threads = i.Threads, kv_dtype = CommonOptions.KvName(i.Kv),
            ceilings = new { peak_gflops = i.Roof.PeakGflops, bandwidth_gbps = i.Roof.BandwidthGBps, ridge = i.Roof.Ridge, cpu = i.Roof.Cpu },
            bf16_gemv_prefetch = i.Tuning is { } t ? new { bytes = t.Bytes, candidates = t.Candidates, median_step_seconds = t.MedianSeconds } : null,
            results = rs.Select(r => new
            {
                test = r.Test, batch = r.Batch, tokens = r.TokensPerRep, seconds = r.Seconds, tok_s = r.MeanTokensPerSecond, sd = r.SdTokensPerSecond,
                flops = r.Flops, bytes = r.Bytes, weight_bytes = r.WeightBytes, gflops = r.Gflops, gbps = r.GBps,
                pct_fma_peak = 100 * r.Gflops / i.Roof.PeakGflops, pct_bandwidth = 100 * r.GBps / i.Roof.BandwidthGBps,
                roof_tok_s = r.BoundTokensPerSecond(i.Roof),
                probe_gbps = r.ProbeGBps, probe_roof_tok_s = r.ProbeMedianGBps > 0 ? r.ProbeBoundTokensPerSecond(i.Roof) : (double?)null,
            }),
        };
        return JsonSerializer.Serialize(o, new JsonSerializerOptions { WriteIndented = true }) + "\n";
    }
}
