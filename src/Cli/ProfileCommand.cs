using System.Diagnostics;
using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using MiniLlm.Engine;
using MiniLlm.Kernels;
using MiniLlm.Loader;
using Spectre.Console;

namespace MiniLlm.Cli;

/// <summary><c>minillm profile</c>: where the time goes, per op and per layer, against this CPU's roofline.</summary>
public static class ProfileCommand
{
    public static Command Create(CliIO io)
    {
        var prompt = new Option<string>("--prompt", "-p") { Description = "Prompt to prefill", DefaultValueFactory = _ => "And God said unto Moses, I AM THAT I AM: and he said, Thus shalt thou say unto the children of Israel" };
        var promptTokens = new Option<int?>("--prompt-tokens")
        {
            Description = "Prefill this many seeded random tokens instead of --prompt (llama-bench's -p): a prompt long enough for prefill to be compute-bound",
        };
        var tokens = new Option<int>("--tokens", "-n") { Description = "Decode steps to profile", DefaultValueFactory = _ => 64 };
        var batch = new Option<int>("--batch", "-b") { Description = "Sequences decoded together (each with the prompt)", DefaultValueFactory = _ => 1 };
        var model = CommonOptions.Model();
        var threads = CommonOptions.Threads();
        var roofFile = new Option<string?>("--roofline") { Description = "Use saved ceilings instead of measuring them now" };
        var output = CommonOptions.Output();
        var plot = new Option<string?>("--plot") { Description = "Write roofline.png/.svg and layers.png/.svg into this directory" };
        var weights = CommonOptions.Weights();
        var mmap = CommonOptions.Mmap();
        var q8Act = CommonOptions.Q8Activations();
        var kvDtype = CommonOptions.KvDtype();
        var cmd = new Command("profile", "Time every op of prefill and decode and set it against the measured roofline")
        {
            prompt, promptTokens, tokens, batch, model, threads, roofFile, output, plot, weights, mmap, q8Act, kvDtype,
        };
        cmd.SetAction(r =>
        {
            int t = RooflineCommand.ResolveThreads(r.GetValue(threads));
            int n = r.GetValue(tokens), b = r.GetValue(batch);
            if (n < 1) throw new ArgumentException($"tokens must be ≥ 1, got {n}", "tokens");
            if (b < 1) throw new ArgumentException($"batch must be ≥ 1, got {b}", "batch");
            var dir = ModelLocator.Resolve(r.GetValue(model));
            using var llm = LlamaModel.Load(dir, t, maxTokens: 512, format: CommonOptions.Format(r.GetValue(weights)!), mapWeights: r.GetValue(mmap));
            llm.Q8Int8Activations = r.GetValue(q8Act) == "int8";
            var ids = r.GetValue(promptTokens) is { } p
                ? p >= 1 ? Benchmark.Tokens(llm, p, seed: 1) : throw new ArgumentException($"prompt tokens must be ≥ 1, got {p}", "prompt-tokens")
                : llm.Tokenizer.Encode(r.GetValue(prompt)!);
            if (ids.Length + n > llm.Context) throw new PromptTooLongException($"prompt ({ids.Length} tokens) + {n} decode steps exceed the context of {llm.Context}");
            if (b * ids.Length > llm.MaxTokens) throw new ArgumentException($"batch × prompt = {b * ids.Length} tokens exceeds one step's {llm.MaxTokens}", "batch");
            bool json = r.GetValue(output) == "json";
            var roof = RooflineCommand.LoadOrMeasure(r.GetValue(roofFile), t, 3, json ? null : io.Err);
            var kv = CommonOptions.KvType(r.GetValue(kvDtype)!);
            var (prefill, decode, decodeProfiler) = Run(llm, ids, n, b, roof, kv);
            if (json) io.Out.WriteLine(Json(llm, dir, roof, prefill, decode, CommonOptions.KvName(kv)));
            else Render(io.Out, llm, dir, roof, prefill, decode, CommonOptions.KvName(kv));
            if (r.GetValue(plot) is { } plotDir)
            {
                string name = Path.GetFileName(dir.TrimEnd('/'));
                Plots.Roofline(plotDir, "roofline", roof, prefill, decode);
                Plots.LayerBars(plotDir, "layers", decodeProfiler, $"{name}: decode time per layer and op (batch {b})");
                if (!json) io.Out.WriteLine($"plots written to {Path.GetFullPath(plotDir)}");
            }
            return ExitCodes.Ok;
        });
        return cmd;
    }

    /// <summary>Timed prefill passes (after one untimed pass over the same prompt), each followed by a sample of the GEMM roof.</summary>
    public const int PrefillPasses = 9;

    /// <summary>Prefill of b copies of the prompt in one pass, then n decode steps for all b; each phase profiled on its own.</summary>
    public static (PhaseProfile Prefill, PhaseProfile Decode, OpProfiler DecodeProfiler) Run(LlamaModel llm, int[] ids, int n, int b, Roofline roof, KvType kv = KvType.F32)
    {
        llm.Warmup(kv);
        var caches = Enumerable.Range(0, b).Select(_ => llm.NewKvCache(ids.Length + n + 1, kv)).ToArray();
        try
        {
            int V = llm.Config.VocabSize, L = llm.Config.NumHiddenLayers;
            var logits = new float[b * V];
            var tokens = Enumerable.Range(0, b).SelectMany(_ => ids).ToArray();
            var slices = caches.Select(c => new SequenceSlice(0, ids.Length, c)).ToArray();
            var cost = CostModel.For(llm, kv);
            long weightBytes = llm.WeightBytes;
            bool fits = weightBytes < roof.LastLevelCacheBytes;

            // The bandwidth a step's bytes are judged against, measured beside each phase on the model's own threads:
            // its weights read op by op in the forward pass's order, dispatches and chunks, with no arithmetic
            // (LlamaModel.MeasureWeightStreamGBps). For a model in DRAM that is DRAM's rate; for one that fits in
            // the last-level cache it is that cache's rate with the fork-join and ramp-up of ~30 short ops a step,
            // which one long probe stream (reported beside it) does not pay. Measured now, not minutes ago: this
            // host's bandwidth moves 2× between minutes.
            using var probe = new Ceilings.ReadProbe(llm.Threads, fits ? weightBytes : 256L << 20);
            var streamSamples = new List<double>();
            var probeSamples = new List<double>();
            void SampleBandwidth()
            {
                llm.MeasureReadBandwidth(probe);   // warm: brings a cache-sized probe into the cache
                for (int i = 0; i < (fits ? 9 : 3); i++) probeSamples.Add(llm.MeasureReadBandwidth(probe));
                streamSamples.Add(llm.MeasureWeightStreamGBps(fits ? 9 : 3));
            }
            string Source()
            {
                string where = fits ? $"last-level cache (the {weightBytes / 1048576.0:F1} MiB of weights fit in it)" : "DRAM";
                string how = llm.UsesTensorParallelDecode
                    ? "the weights read as the one-dispatch decode cuts them (each thread its own rows and column slices), loads only: no arithmetic, no barriers"
                    : "the weights read op by op with the engine's own dispatches and no arithmetic";
                return $"{where} at {Ceilings.Median(streamSamples):F1} GB/s:\n  {how} " +
                       $"(one long probe stream over {probe.Bytes / 1048576.0:F0} MiB: {Ceilings.Median(probeSamples):F1} GB/s)";
            }

            // Compute roofs the kernels can reach at this prompt's rows and at the decode batch (same run). Not for
            // one row: a GEMV's FLOP rate is its bandwidth, and decode at batch 1 is judged by bytes alone.
            int preRows = Math.Min(llm.MaxTokens, b * ids.Length);
            double gemmDecode = b >= 2 ? llm.MeasureGemmGflops(b, sequences: b) : 0;

            // Prefill: one pass over this very prompt, thrown away (first calls of its code paths, first touch of its
            // KV pages), then PrefillPasses timed ones; the rows are their mean. After each, one timing of the same
            // rows' GEMMs alone (the compute roof): roof and passes take turns in the same seconds and both are
            // quoted as medians, as decode does with its weight stream.
            llm.Profiler = new OpProfiler(L);   // profiled too: the first profiled pass pays one-time costs (~0.3 ms)
            llm.Forward(tokens, slices, logits);
            llm.Profiler = null;
            if (preRows >= 2) llm.SampleGemmGflops(preRows, sequences: b);   // warm: the GEMM pass's code and buffers
            // Each profiled pass has an unprofiled twin (which goes first alternates): the per-op rows come from the
            // profiled ones, the phase's tok/s from the twins, so the Stopwatch reads are not in the speed quoted.
            var pre = new OpProfiler(L);
            var gemmSamples = new List<double>();
            var preTimes = new List<double>();
            SampleBandwidth();
            for (int p = 0; p < PrefillPasses; p++)
            {
                for (int twin = 0; twin < 2; twin++)
                {
                    if ((twin + p) % 2 == 0) { llm.Profiler = pre; llm.Forward(tokens, slices, logits); llm.Profiler = null; }
                    else preTimes.Add(TimedForward(llm, tokens, slices, logits));
                }
                if (preRows >= 2) gemmSamples.Add(llm.SampleGemmGflops(preRows, sequences: b));
            }
            double gemmPrefill = preRows >= 2 ? Ceilings.Median(gemmSamples) : 0;
            var preCost = cost.Step(Enumerable.Repeat(new StepSequence(ids.Length, ids.Length), b).ToList(), b);
            var prefillCosts = Enumerable.Repeat(preCost, PrefillPasses).SelectMany(c => c).ToList();
            SampleBandwidth();
            var prefill = ProfileReport.Build("prefill", PrefillPasses * b * ids.Length, pre, prefillCosts, L, roof, Ceilings.Median(streamSamples), Source(), gemmPrefill, preTimes);
            streamSamples.Clear();
            probeSamples.Clear();
            SampleBandwidth();

            // Decode steps alternate between profiled (the rows) and timed with no profiler (the tok/s), the order
            // flipped every 16 steps: a key tile completes every 16th position (its transpose costs a barrier), and a
            // plain even/odd split would put every completion on the same side. With one step there is no unprofiled
            // twin and the profiled step gives the speed.
            static bool Profiled(int step) => (step + step / KvView.Tile) % 2 == 0;
            var dec = new OpProfiler(L);
            var next = new int[b];
            var costs = new List<OpCost>();
            var decTimes = new List<double>();
            for (int s = 0; s < n; s++)
            {
                for (int i = 0; i < b; i++)
                {
                    next[i] = Ops.ArgMax(logits.AsSpan(i * V, V));
                    slices[i] = new SequenceSlice(ids.Length + s, 1, caches[i]);
                }
                if (Profiled(s)) { llm.Profiler = dec; llm.Forward(next, slices, logits); llm.Profiler = null; }
                else decTimes.Add(TimedForward(llm, next, slices, logits));
                // After every step, one sample of the weight stream: ceiling and steps taken turn about, in the
                // same seconds, and both are quoted as medians, so a neighbour's busy moment moves neither.
                streamSamples.Add(llm.MeasureWeightStreamGBps(reps: 1, warm: false));
            }
            for (int s = 0; s < n; s++)   // the profiled steps' costs, counted after the timed steps so the pool never idles between them
                if (Profiled(s)) costs.AddRange(cost.Step(Enumerable.Repeat(new StepSequence(1, ids.Length + s + 1), b).ToList(), b));
            SampleBandwidth();
            var decode = ProfileReport.Build("decode", b * dec.Passes, dec, costs, L, roof, Ceilings.Median(streamSamples), Source(), gemmDecode, decTimes);
            return (prefill, decode, dec);
        }
        finally { foreach (var c in caches) c.Dispose(); }
    }

    /// <summary>One forward pass with no profiler attached, its wall time in seconds.</summary>
    private static double TimedForward(LlamaModel llm, ReadOnlySpan<int> tokens, ReadOnlySpan<SequenceSlice> slices, float[] logits)
    {
        long t0 = Stopwatch.GetTimestamp();
        llm.Forward(tokens, slices, logits);
        return Stopwatch.GetElapsedTime(t0).TotalSeconds;
    }

    private static string F(double v, string f = "F1") => v.ToString(f, CultureInfo.InvariantCulture);

    private static void Render(TextWriter w, LlamaModel llm, string dir, Roofline roof, PhaseProfile pre, PhaseProfile dec, string kvDtype)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(w), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors, Interactive = InteractionSupport.No });
        console.Profile.Width = 160;
        console.WriteLine($"model {Path.GetFileName(dir.TrimEnd('/'))} ({llm.WeightLabel}, KV cache {kvDtype}): {pre.WeightBytes / PrefillPasses / 1048576.0:F1} MiB of weights read per step, {llm.Threads} threads, {roof.Cpu}");
        console.WriteLine($"roofline (measured {(roof.MeasuredUtc > DateTime.UtcNow.AddMinutes(-10) ? "in this run" : roof.MeasuredUtc.ToString("u"))}): FMA peak {F(roof.PeakGflops)} GFLOP/s, DRAM {F(roof.BandwidthGBps)} GB/s, ridge {F(roof.Ridge, "F2")} FLOP/byte");
        if (llm.GemvPrefetch is { } tuned) console.WriteLine($"tuned at warm-up: {tuned}");
        foreach (var p in new[] { pre, dec })
        {
            console.WriteLine();
            console.WriteLine($"{p.Phase}: {p.Tokens} tokens in {F(p.Seconds * 1000, "F2")} ms, {p.Steps} profiled passes (median {F(p.MedianStepSeconds * 1000, "F3")} ms; the rows below)" +
                              (p.UnprofiledMedianStepSeconds > 0 ? "" : $"; mean {F(p.MeanTokensPerSecond)} tok/s"));
            if (p.UnprofiledMedianStepSeconds > 0)
                console.WriteLine($"  timed alone between them: {p.UnprofiledStepSeconds!.Count} unprofiled passes, median {F(p.UnprofiledMedianStepSeconds * 1000, "F3")} ms " +
                                  $"(the tok/s below), mean {F(p.MeanTokensPerSecond)} tok/s; profiling adds {F(100 * p.ProfilerOverhead)} %");
            console.WriteLine($"  bytes counted against {p.BandwidthSource}");
            console.Write(Table(p.Ops, roof, p.BandwidthUsedGBps, "op", r => p.RoofSeconds(r, roof)));
            if (p.BarrierWaits.Count > 0)
                console.WriteLine($"  barrier waits, mean per pass of {F(p.Seconds / p.Steps * 1e6)} µs: " +
                                  string.Join(", ", p.BarrierWaits.Select((s, t) => $"thread {t} {F(s * 1e6)} µs")) +
                                  " (a thread that arrives first waits for the other; thread 0's are the row above)");
        }
        console.WriteLine();
        console.WriteLine("per layer (decode)");
        console.Write(Table(dec.Layers, roof, dec.BandwidthUsedGBps, "layer"));
        console.WriteLine();
        foreach (var p in new[] { pre, dec })
            console.WriteLine($"{p.Phase,-8} measured {F(p.TokensPerSecond),9} tok/s (median pass) | predicted ceiling {F(p.PredictedTokensPerSecond(roof)),9} tok/s " +
                              $"({F(100 * p.TokensPerSecond / p.PredictedTokensPerSecond(roof), "F0")} % of it) | MFU {F(100 * p.Mfu(roof))} % | MBU {F(100 * p.Mbu)} % | {F(p.Flops / p.Bytes, "F2")} FLOP/byte");
        foreach (var p in new[] { pre, dec })
        {
            string roofText = p.GemmGflops > 0
                ? $"{F(p.ComputeRoofGflops(roof))} GFLOP/s (own GEMMs of every layer at these rows, cut between the threads as the pass cuts them, now; {F(100 * p.ComputeRoofGflops(roof) / roof.PeakGflops, "F0")} % of FMA peak)"
                : $"{F(roof.PeakGflops)} GFLOP/s (FMA peak)";
            var (cs, ms, ts) = p.RoofSeconds(roof);
            double perPass = p.Steps > 0 ? 1e6 / p.Steps : 1e6;   // µs a pass
            console.WriteLine($"{p.Phase} ceiling = tokens ÷ Σ over the ops of max(FLOPs ÷ compute roof, bytes ÷ bandwidth) = {F(p.PredictedTokensPerSecond(roof))} tok/s");
            console.WriteLine($"  a pass at the roofline: {F(ts * perPass)} µs = {F(cs * perPass)} µs of FLOPs (at {roofText}) " +
                              $"+ {F(ms * perPass)} µs of bytes (at {F(p.BandwidthUsedGBps)} GB/s); the op rows' \"ms at roof\" column");
            console.WriteLine(p.WholePhaseComputeBound(roof)
                ? $"  the phase as one op (bytes hidden under FLOPs): compute roof ÷ FLOPs per token = {F(p.ComputeRoofGflops(roof))} GFLOP/s ÷ {F(p.Flops / p.Tokens / 1e9, "F3")} GFLOP = {F(p.WholePhasePredictedTokensPerSecond(roof))} tok/s"
                : $"  the phase as one op: bandwidth ÷ bytes per token = {F(p.BandwidthUsedGBps)} GB/s ÷ {F(p.Bytes / p.Tokens / 1e6, "F2")} MB = {F(p.WholePhasePredictedTokensPerSecond(roof))} tok/s");
            if (Gap(p, roof) is { } gap) console.WriteLine(gap);
        }
        console.WriteLine($"prefill : decode per-token speed = {F(pre.TokensPerSecond / dec.TokensPerSecond)} : 1");
    }

    /// <summary>
    /// One line saying where the phase's pass loses to its ceiling: the ops whose median time in a pass exceeds their
    /// time at the roofline by the most, in µs a pass, then the rest together; null without passes.
    /// </summary>
    private static string? Gap(PhaseProfile p, Roofline roof)
    {
        var gaps = p.GapPerPass(roof);
        if (gaps.Count == 0) return null;
        double pass = p.Tokens / (double)p.Steps / p.TokensPerSecond * 1e6;   // the pass the tok/s is quoted from
        double atRoof = p.RoofSeconds(roof).Total / p.Steps * 1e6;
        const int Shown = 5;
        var top = gaps.Take(Shown).Where(g => g.Seconds > 0).ToList();
        double rest = gaps.Sum(g => g.Seconds) - top.Sum(g => g.Seconds);
        string others = $"{(top.Count > 0 ? "all others" : "no op over its roof; all")} {(rest >= 0 ? "+" : "")}{F(rest * 1e6)}";
        return $"  where a pass loses to it: {F(pass)} µs measured against {F(atRoof)} µs at the roofline; each op's median µs a pass over its time at the roofline:{Environment.NewLine}    " +
               string.Concat(top.Select(g => $"{g.Name} +{F(g.Seconds * 1e6)}, ")) + others;
    }

    /// <param name="atRoof">When given, a column of each row's seconds at the roofline (the ceiling's terms).</param>
    private static Table Table(IReadOnlyList<ProfileRow> rows, Roofline roof, double bw, string first, Func<ProfileRow, double>? atRoof = null)
    {
        var t = new Table().AddColumn(first);
        foreach (var h in new[] { "ms", "share", "GFLOP/s", "GB/s", "FLOP/byte", "bound", "% of roof" }) t.AddColumn(new TableColumn(h).RightAligned());
        if (atRoof != null) t.AddColumn(new TableColumn("ms at roof").RightAligned());
        foreach (var r in rows)
        {
            var (bound, of) = ProfileReport.Verdict(r, roof, bw);
            var cells = new List<string> { Markup.Escape(r.Name), F(r.Seconds * 1000, "F3"), F(100 * r.Share) + " %", F(r.Gflops), F(r.GBps), F(r.Intensity, "F2"), r.Flops == 0 ? "-" : bound, r.Flops == 0 ? "-" : F(100 * of) + " %" };
            if (atRoof != null) cells.Add(F(atRoof(r) * 1000, "F3"));
            t.AddRow(cells.ToArray());
        }
        return t;
    }

    private static string Json(LlamaModel llm, string dir, Roofline roof, PhaseProfile pre, PhaseProfile dec, string kvDtype)
    {
        object Phase(PhaseProfile p) => new
        {
            tokens = p.Tokens, seconds = p.Seconds, passes = p.Steps, median_pass_seconds = p.MedianStepSeconds, tok_s = p.TokensPerSecond, mean_tok_s = p.MeanTokensPerSecond,
            unprofiled_pass_seconds = p.UnprofiledStepSeconds ?? [], unprofiled_median_pass_seconds = p.UnprofiledMedianStepSeconds, profiler_overhead = p.ProfilerOverhead, predicted_tok_s = p.PredictedTokensPerSecond(roof),
            predicted_tok_s_whole_phase = p.WholePhasePredictedTokensPerSecond(roof), roof_seconds_per_pass = p.RoofSeconds(roof).Total / Math.Max(1, p.Steps),
            compute_roof_gflops = p.ComputeRoofGflops(roof), gemm_gflops = p.GemmGflops, predicted_bound = p.ComputeBound(roof) ? "compute" : "memory",
            flops = p.Flops, bytes = p.Bytes, weight_bytes = p.WeightBytes, mfu = p.Mfu(roof), mbu = p.Mbu, bandwidth_gbps = p.BandwidthUsedGBps,
            bandwidth_source = p.BandwidthSource, barrier_wait_seconds_per_pass = p.BarrierWaits,
            gap_seconds_per_pass = p.GapPerPass(roof).Select(g => new { name = g.Name, seconds = g.Seconds }),
            ops = p.Ops.Select(r => Row(r, roof, p.BandwidthUsedGBps, p.RoofSeconds(r, roof))), layers = p.Layers.Select(r => Row(r, roof, p.BandwidthUsedGBps)),
        };
        return JsonSerializer.Serialize(new
        {
            model = dir, threads = llm.Threads, kv_dtype = kvDtype,
            bf16_gemv_prefetch = llm.GemvPrefetch is { } t ? new { bytes = t.Bytes, candidates = t.Candidates, median_step_seconds = t.MedianSeconds } : null,
            roofline = new { peak_gflops = roof.PeakGflops, bandwidth_gbps = roof.BandwidthGBps, ridge = roof.Ridge },
            prefill = Phase(pre), decode = Phase(dec), prefill_to_decode = pre.TokensPerSecond / dec.TokensPerSecond,
        }, new JsonSerializerOptions { WriteIndented = true });
    }

    /// <param name="roofSeconds">An op row's seconds at the roofline (the ceiling's term; layer rows have none).</param>
    private static object Row(ProfileRow r, Roofline roof, double bw, double? roofSeconds = null)
    {
        var (bound, of) = ProfileReport.Verdict(r, roof, bw);
        if (roofSeconds is { } rs)
            return new { name = r.Name, seconds = r.Seconds, median_pass_seconds = r.MedianPassSeconds, share = r.Share, flops = r.Flops, bytes = r.Bytes, gflops = r.Gflops, gbps = r.GBps, flop_per_byte = r.Intensity, bound, fraction_of_roof = of, roof_seconds = rs };
        return new { name = r.Name, seconds = r.Seconds, share = r.Share, flops = r.Flops, bytes = r.Bytes, gflops = r.Gflops, gbps = r.GBps, flop_per_byte = r.Intensity, bound, fraction_of_roof = of };
    }
}
