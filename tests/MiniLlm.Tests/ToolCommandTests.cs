using System.Text.Json;
using MiniLlm.Cli;
using MiniLlm.Engine;
using MiniLlm.Kernels;
using MiniLlm.Loader;

namespace MiniLlm.Tests;

/// <summary>synth, roofline and bench: they run, write what they say, and refuse bad arguments.</summary>
public class ToolCommandTests
{
    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        return (CliApp.Run(args, o, e), o.ToString(), e.ToString());
    }

    [Theory]
    [InlineData("f32", DType.F32)]
    [InlineData("bf16", DType.BF16)]
    [InlineData("f16", DType.F16)]
    public void SynthWritesALoadableSeededModel(string dtype, DType expected)
    {
        var a = TestPaths.NewTempDir("synth-a");
        var b = TestPaths.NewTempDir("synth-b");
        string[] args = ["synth", "--hidden", "64", "--layers", "2", "--ffn", "96", "--heads", "4", "--kv-heads", "2", "--vocab", "4096", "--context", "64", "--dtype", dtype, "--seed", "5"];
        Assert.Equal(0, Run([.. args, "--out", a]).Code);
        Assert.Equal(0, Run([.. args, "--out", b]).Code);
        Assert.Equal(File.ReadAllBytes(Path.Combine(a, "model.safetensors")), File.ReadAllBytes(Path.Combine(b, "model.safetensors")));
        using var model = LlamaModel.Load(a);
        Assert.Equal(expected, model.Files.Weights.Layers[0].Wq.DType);
        Assert.Equal(2, model.Config.NumKeyValueHeads);
        Assert.NotNull(model.Files.Tokenizer);   // 4096 vocab gets tiny-kjv's tokenizer
        var result = new Generator(model).Generate("In the beginning", new GenerationOptions { MaxTokens = 5, Sampling = SamplingParams.Greedy, StopAtEos = false });
        Assert.Equal(5, result.OutputIds.Length);
    }

    [Fact]
    public void SynthKnowsTheNamedShapes()
    {
        var s = ModelShape.Get("stories110m");
        Assert.Equal((768, 2048, 12, 12, 12, 32000, true), (s.Hidden, s.Intermediate, s.Layers, s.Heads, s.KvHeads, s.Vocab, s.Tied));
        var t = ModelShape.Get("tinyllama-4l");
        Assert.Equal((2048, 5632, 4, 32, 4, 32000, false), (t.Hidden, t.Intermediate, t.Layers, t.Heads, t.KvHeads, t.Vocab, t.Tied));
        var (code, _, err) = Run("synth", "--shape", "gpt5", "--out", TestPaths.NewTempDir("bad"));
        Assert.Equal(ExitCodes.BadArguments, code);
        Assert.Contains("gpt5", err);
    }

    [Fact]
    public void CeilingsAreMeasuredAndSaved()
    {
        double peak = Ceilings.MeasureFmaPeak(1, reps: 1, iterations: 200_000);
        double bw = Ceilings.MeasureReadBandwidth(1, 8 << 20, reps: 1);
        Assert.True(peak > 1 && bw > 0.1, $"peak {peak} GFLOP/s, bandwidth {bw} GB/s");
        using (var pool = new WorkerPool(2))
        {
            var probe = new Ceilings.ReadProbe(2, 8 << 20);
            Assert.Equal(8 << 20, probe.Bytes);
            Assert.True(probe.Measure(pool) > 0.1 && probe.Measure(passes: 2) > 0.1);
            probe.Dispose();
            Assert.Throws<ObjectDisposedException>(() => probe.Measure(pool));
        }
        var roof = new Roofline
        {
            Cpu = "test", Threads = 1, Isa = "V512", PeakGflops = peak, BandwidthGBps = bw, CacheBandwidth = [],
            Caches = Ceilings.DetectCaches(), DramBufferBytes = 8 << 20, Reps = 1, MeasuredUtc = DateTime.UtcNow,
        };
        var path = Path.Combine(TestPaths.NewTempDir("roof"), "roofline.json");
        roof.Save(path);
        var back = Roofline.TryLoad(path)!;
        Assert.Equal(peak, back.PeakGflops);
        Assert.Equal(bw, back.BandwidthGBps);
        Assert.Equal(peak / bw, back.Ridge, 9);
    }

    /// <summary>Saved ceilings of 100 GFLOP/s and 10 GB/s (2 threads), so a command's own measurements can be told from them.</summary>
    private static string SavedTestRoofline(string name)
    {
        var path = Path.Combine(TestPaths.NewTempDir(name), "roof.json");
        new Roofline
        {
            Cpu = "test", Threads = 2, Isa = "V512", PeakGflops = 100, BandwidthGBps = 10, CacheBandwidth = [], Caches = [],
            DramBufferBytes = 0, Reps = 1, MeasuredUtc = DateTime.UtcNow,
        }.Save(path);
        return path;
    }

    /// <summary>A random-weight model (hidden 64, ffn 96, 4 heads over 2 KV heads, vocab 4096, context 64) written by <c>synth</c>.</summary>
    private static string SmallSynthModel(string name, int layers)
    {
        var dir = TestPaths.NewTempDir(name);
        Assert.Equal(0, Run("synth", "--hidden", "64", "--layers", layers.ToString(), "--ffn", "96", "--heads", "4", "--kv-heads", "2", "--vocab", "4096", "--context", "64", "--out", dir).Code);
        return dir;
    }

    /// <summary>`profile … --roofline <paramref name="roofPath"/> --output json` on <paramref name="dir"/>: asserts it succeeded, returns the parsed output.</summary>
    private static JsonDocument ProfileJson(string dir, string roofPath, params string[] args)
    {
        var (code, stdout, stderr) = Run(["profile", "-m", dir, .. args, "--roofline", roofPath, "--output", "json"]);
        Assert.True(code == 0, stderr);
        return JsonDocument.Parse(stdout);
    }

    [Fact]
    public void BenchReportsEveryTestAgainstTheGivenCeilings()
    {
        var roofPath = SavedTestRoofline("bench");
        var (code, stdout, stderr) = Run("bench", "-p", "16", "-n", "4", "-b", "1,3", "-r", "2", "--roofline", roofPath, "--output", "json", "-t", "2");
        Assert.True(code == 0, stderr);
        using var doc = JsonDocument.Parse(stdout);
        var results = doc.RootElement.GetProperty("results").EnumerateArray().ToList();
        Assert.Equal(["pp16", "tg4", "tg4 b3"], results.Select(r => r.GetProperty("test").GetString()));
        foreach (var r in results)
        {
            Assert.True(r.GetProperty("tok_s").GetDouble() > 0);
            Assert.Equal(2, r.GetProperty("seconds").GetArrayLength());
            // GB/s and % of bandwidth are consistent with the ceilings passed in
            Assert.Equal(r.GetProperty("gbps").GetDouble() * 10, r.GetProperty("pct_bandwidth").GetDouble(), 6);
        }
        // A bf16 KV cache: the same tests, half the KV bytes counted (prefill writes 16 positions, decode reads them)
        var half = Run("bench", "-p", "16", "-n", "4", "-b", "1,3", "-r", "2", "--roofline", roofPath, "--output", "json", "-t", "2", "--kv-dtype", "bf16");
        Assert.True(half.Code == 0, half.Err);
        using var halfDoc = JsonDocument.Parse(half.Out);
        Assert.Equal("bf16", halfDoc.RootElement.GetProperty("kv_dtype").GetString());
        Assert.Equal("f32", doc.RootElement.GetProperty("kv_dtype").GetString());
        var halfResults = halfDoc.RootElement.GetProperty("results").EnumerateArray().ToList();
        for (int i = 0; i < results.Count; i++)
        {
            double bytes = results[i].GetProperty("bytes").GetDouble(), halfBytes = halfResults[i].GetProperty("bytes").GetDouble();
            Assert.True(halfBytes < bytes, $"{results[i].GetProperty("test")}: {halfBytes} bytes with a bf16 cache, {bytes} with fp32");
            Assert.Equal(results[i].GetProperty("weight_bytes").GetDouble(), halfResults[i].GetProperty("weight_bytes").GetDouble());
        }
        Assert.NotEqual(0, Run("bench", "-n", "2", "--kv-dtype", "f16", "--roofline", roofPath).Code);
        var md = Run("bench", "-p", "8", "-n", "2", "-r", "1", "--roofline", roofPath, "--output", "md");
        Assert.Contains("| pp8", md.Out);
        Assert.NotEqual(0, Run("bench", "-p", "x", "--roofline", roofPath).Code);
        Assert.NotEqual(0, Run("bench", "-b", "0", "--roofline", roofPath).Code);
    }

    [Fact]
    public void PredictionSumsEachOpAtTheRoofline()
    {
        var roof = new Roofline
        {
            Cpu = "test", Threads = 2, Isa = "V512", PeakGflops = 100, BandwidthGBps = 10, CacheBandwidth = [], Caches = [],
            DramBufferBytes = 0, Reps = 1, MeasuredUtc = DateTime.UtcNow,
        };
        // At the 50 GFLOP/s GEMM roof and 10 GB/s: a product of 5e9 FLOPs and 1e8 bytes (compute-bound: 0.1 s of
        // FLOPs, 0.01 s of bytes), a norm of 1e8 FLOPs and 5e8 bytes (memory-bound: 0.05 s of bytes, 0.002 s of
        // FLOPs), and an op with no FLOPs and 1e8 bytes (0.01 s). 16 tokens over 2 passes.
        ProfileRow[] ops = [new("Gate + Up", 0.3, 0.5, 5e9, 1e8), new("FfnNorm", 0.2, 0.3, 1e8, 5e8), new("Embedding", 0.1, 0.2, 0, 1e8)];
        var p = new PhaseProfile("prefill", 16, 0.6, 5.1e9, 7e8, 1e8, ops, [], 10, "DRAM", 50, Steps: 2);
        var (compute, memory, total) = p.RoofSeconds(roof);
        Assert.Equal(0.1, compute, 12);
        Assert.Equal(0.06, memory, 12);
        Assert.Equal(0.16, total, 12);
        Assert.Equal(16 / 0.16, p.PredictedTokensPerSecond(roof), 9);
        Assert.True(p.ComputeBound(roof));
        Assert.Equal(0.05, p.RoofSeconds(ops[1], roof), 12);
        // As one op the norm's bytes hide under the product's FLOPs: 16 ÷ max(5.1e9 / 50e9, 7e8 / 10e9) = 16 ÷ 0.102.
        Assert.Equal(16 / 0.102, p.WholePhasePredictedTokensPerSecond(roof), 9);
        // Memory-bound ops outweighing the compute-bound: the phase's verdict follows the larger sum.
        var light = p with { Ops = [new("Gate + Up", 0.3, 0.5, 1e9, 1e8), ops[1], ops[2]] };   // 0.02 s of FLOPs, 0.06 of bytes
        Assert.False(light.ComputeBound(roof));
        Assert.Equal(0.08, light.RoofSeconds(roof).Total, 12);
        // No op rows: the phase as one op.
        Assert.Equal(p.WholePhasePredictedTokensPerSecond(roof), (p with { Ops = [] }).PredictedTokensPerSecond(roof), 12);
    }

    [Fact]
    public void GapPerPassIsEachOpsMedianPassOverItsRoofTime()
    {
        var roof = new Roofline
        {
            Cpu = "test", Threads = 2, Isa = "V512", PeakGflops = 100, BandwidthGBps = 10, CacheBandwidth = [], Caches = [],
            DramBufferBytes = 0, Reps = 1, MeasuredUtc = DateTime.UtcNow,
        };
        // Two passes at 10 GB/s: a product of 2e8 bytes (0.02 s at the roofline, 0.01 a pass) whose median pass took
        // 0.013 s; a norm of 2e6 bytes (1e-4 a pass) at 4e-4; a long stream beating the phase's bandwidth (1e8 bytes:
        // 5e-3 a pass, median 4e-3); the barrier waits (no bytes) at 2e-3.
        ProfileRow[] ops = [new("Down", 0.03, 0.5, 1e8, 2e8, 0.013), new("FfnNorm", 1e-3, 0.1, 1e6, 2e6, 4e-4),
            new("LmHead", 9e-3, 0.3, 5e7, 1e8, 4e-3), new(ProfileReport.BarrierWaitName, 5e-3, 0.1, 0, 0, 2e-3)];
        var p = new PhaseProfile("decode", 2, 0.045, 1.51e8, 3.02e8, 3e8, ops, [], 10, "DRAM", 0, Steps: 2);
        var gap = p.GapPerPass(roof);
        Assert.Equal(["Down", ProfileReport.BarrierWaitName, "FfnNorm", "LmHead"], gap.Select(g => g.Name));   // largest first
        Assert.Equal(3e-3, gap[0].Seconds, 12);
        Assert.Equal(2e-3, gap[1].Seconds, 12);
        Assert.Equal(3e-4, gap[2].Seconds, 12);
        Assert.Equal(-1e-3, gap[3].Seconds, 12);   // above its roof: negative
        Assert.Empty((p with { Steps = 0 }).GapPerPass(roof));
    }

    [Fact]
    public void OpProfilerKeepsEachOpsTimePerPass()
    {
        // A cache-resident model on two threads takes the one-dispatch pass, whose barriers thread 0 times.
        var dir = SmallSynthModel("prof-passes", layers: 2);
        using var model = LlamaModel.Load(dir, threads: 2);
        Assert.True(model.UsesTensorParallelDecode);
        using var cache = model.NewKvCache();
        var logits = new float[model.Config.VocabSize];
        model.Forward([1, 2, 3], 0, cache, logits);
        var prof = new OpProfiler(model.Config.NumHiddenLayers);
        model.Profiler = prof;
        var kinds = Enum.GetValues<OpKind>();
        var perPass = kinds.ToDictionary(k => k, _ => new List<double>());
        var waits = new List<double>();
        for (int s = 0; s < 5; s++)
        {
            var before = kinds.ToDictionary(k => k, k => prof.Seconds(k));
            double waitedBefore = prof.OwnWaitSeconds();
            model.Forward([4 + s], 3 + s, cache, logits);
            foreach (var k in kinds) perPass[k].Add(prof.Seconds(k) - before[k]);
            waits.Add(prof.OwnWaitSeconds() - waitedBefore);
        }
        model.Profiler = null;
        Assert.Equal(5, prof.Passes);
        static double Median(List<double> v) { var o = v.Order().ToList(); return o[o.Count / 2]; }
        foreach (var k in kinds) Assert.Equal(Median(perPass[k]), prof.MedianPassOpSeconds(k), 9);
        Assert.True(prof.MedianPassOpSeconds(OpKind.LmHead) > 0);
        Assert.Equal(Median(waits), prof.MedianPassOwnWaitSeconds(), 9);
        prof.Reset();
        Assert.Equal(0, prof.MedianPassOpSeconds(OpKind.LmHead));
    }

    [Fact]
    public void PredictionDividesByTheMeasuredGemmRoofWhenThereIsOne()
    {
        var roof = new Roofline
        {
            Cpu = "test", Threads = 2, Isa = "V512", PeakGflops = 100, BandwidthGBps = 10, CacheBandwidth = [], Caches = [],
            DramBufferBytes = 0, Reps = 1, MeasuredUtc = DateTime.UtcNow,
        };
        // 10 tokens, 1e10 FLOPs, 1e9 bytes: FLOPs at 100 GFLOP/s take 0.1 s, bytes at 10 GB/s 0.1 s.
        PhaseProfile P(double gemm) => new("prefill", 10, 1, 1e10, 1e9, 1e9, [], [], 10, "DRAM", gemm);
        Assert.Equal(100, P(0).PredictedTokensPerSecond(roof), 9);                // FMA peak
        Assert.Equal(50, P(50).PredictedTokensPerSecond(roof), 9);                // measured GEMM: 0.2 s of FLOPs
        Assert.True(P(50).ComputeBound(roof));
        Assert.Equal(100, P(400).PredictedTokensPerSecond(roof), 9);              // never above the FMA peak

        // Passes timed one by one: rates come from the median pass (1 s over 4 passes, the median one 0.2 s).
        var timed = new PhaseProfile("decode", 8, 1, 1e10, 1e9, 1e9, [], [], 10, "DRAM", 0, Steps: 4, MedianStepSeconds: 0.2);
        Assert.Equal(8 / (4 * 0.2), timed.TokensPerSecond, 9);
        Assert.Equal(8, timed.MeanTokensPerSecond, 9);
        Assert.Equal(1e9 / 8 * 10 / 1e9, timed.GBps, 9);                      // bytes per token × tokens/s
        Assert.Equal(10, P(0).TokensPerSecond, 9);                             // no passes: the mean

        // Unprofiled twins timed between the profiled passes: the speed comes from them (2 tokens a pass; median
        // 0.15 s, mean 0.55 / 3 s), and the profiled median against theirs is the profiler's overhead.
        var twins = timed with { UnprofiledStepSeconds = [0.1, 0.3, 0.15] };
        Assert.Equal(2 / 0.15, twins.TokensPerSecond, 9);
        Assert.Equal(2 / (0.55 / 3), twins.MeanTokensPerSecond, 9);
        Assert.Equal(0.2 / 0.15 - 1, twins.ProfilerOverhead, 9);
        Assert.Equal(1e9 / 8 * (2 / 0.15) / 1e9, twins.GBps, 9);
        Assert.Equal(0, timed.ProfilerOverhead);

        var dir = TestPaths.NewTempDir("gemm-roof");
        Assert.Equal(0, Run("synth", "--hidden", "64", "--layers", "1", "--ffn", "96", "--heads", "4", "--kv-heads", "2", "--vocab", "4096", "--context", "64", "--out", dir).Code);
        using var model = LlamaModel.Load(dir, threads: 2, maxTokens: 32);
        double g = model.MeasureGemmGflops(17, reps: 1);
        Assert.True(g > 0 && double.IsFinite(g), $"{g} GFLOP/s");
        Assert.Throws<ArgumentOutOfRangeException>(() => model.MeasureGemmGflops(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.MeasureGemmGflops(33));
        // A 16-row prompt of one sequence takes the tensor-parallel pass here (a cache-resident model): its roof is
        // that pass's GEMMs; four sequences' 16 rows go op by op. Both time real work.
        Assert.True(model.UsesTensorParallelPrefill(16));
        foreach (int sequences in new[] { 1, 4 })
        {
            double s = model.SampleGemmGflops(16, sequences);
            Assert.True(s > 0 && double.IsFinite(s), $"{s} GFLOP/s ({sequences} sequences)");
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => model.SampleGemmGflops(1));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.SampleGemmGflops(33));
    }

    [Fact]
    public void ProfilePrefillsSyntheticPromptsOfAChosenLength()
    {
        var dir = SmallSynthModel("profile-pp", layers: 1);
        var roofPath = SavedTestRoofline("profile-pp-roof");
        using var doc = ProfileJson(dir, roofPath, "--prompt-tokens", "20", "-n", "3", "-t", "2");
        Assert.Equal(20 * ProfileCommand.PrefillPasses, doc.RootElement.GetProperty("prefill").GetProperty("tokens").GetInt32());
        var bad = Run("profile", "-m", dir, "--prompt-tokens", "0", "--roofline", roofPath);
        Assert.NotEqual(0, bad.Code);
        Assert.Contains("prompt tokens must be ≥ 1", bad.Err);
        var tooLong = Run("profile", "-m", dir, "--prompt-tokens", "60", "-n", "8", "--roofline", roofPath);
        Assert.NotEqual(0, tooLong.Code);
        Assert.Contains("exceed the context of 64", tooLong.Err);
    }

    [Fact]
    public void ProfileTimesEveryOpAsItRunsAndJudgesDecodeByTheWeightStream()
    {
        var dir = SmallSynthModel("profile", layers: 2);
        var roofPath = SavedTestRoofline("profile-roof");
        using var doc = ProfileJson(dir, roofPath, "-n", "5", "-p", "In the beginning", "-t", "2");
        var pre = doc.RootElement.GetProperty("prefill");
        var dec = doc.RootElement.GetProperty("decode");
        Assert.Equal(3, dec.GetProperty("tokens").GetInt32());   // steps 0, 2 and 4 profiled; 1 and 3 timed alone
        Assert.Equal(0, pre.GetProperty("tokens").GetInt32() % ProfileCommand.PrefillPasses);   // timed passes after a warm one
        foreach (var phase in new[] { pre, dec })
        {
            var names = phase.GetProperty("ops").EnumerateArray().Select(o => o.GetProperty("name").GetString()).ToList();
            // Grouped dispatches are timed as they run, never split into calls an unprofiled pass does not make.
            Assert.Contains("QKV projections", names);
            Assert.Contains("Gate + Up", names);
            Assert.DoesNotContain("KProj", names);
            Assert.DoesNotContain("Up", names);
            double opSeconds = phase.GetProperty("ops").EnumerateArray().Sum(o => o.GetProperty("seconds").GetDouble());
            Assert.Equal(phase.GetProperty("seconds").GetDouble(), opSeconds, 9);
            // Every FLOP of the cost model lands in some row, grouped or not.
            double opFlops = phase.GetProperty("ops").EnumerateArray().Sum(o => o.GetProperty("flops").GetDouble());
            Assert.Equal(phase.GetProperty("flops").GetDouble(), opFlops, 3);
            // The bandwidth is measured now, on the model's threads, not the saved 10 GB/s.
            double bw = phase.GetProperty("bandwidth_gbps").GetDouble();
            Assert.True(bw > 0 && double.IsFinite(bw) && bw != 10, $"{bw} GB/s");
            Assert.Contains("no arithmetic", phase.GetProperty("bandwidth_source").GetString());   // loads only, cut as the kernels cut the weights
        }
        Assert.Equal(3, dec.GetProperty("passes").GetInt32());
        Assert.Equal(2, dec.GetProperty("unprofiled_pass_seconds").GetArrayLength());
        Assert.Equal(ProfileCommand.PrefillPasses, pre.GetProperty("unprofiled_pass_seconds").GetArrayLength());   // a twin for every profiled pass
        Assert.Equal(ProfileCommand.PrefillPasses, pre.GetProperty("passes").GetInt32());
        foreach (var phase in new[] { pre, dec })
        {
            double median = phase.GetProperty("median_pass_seconds").GetDouble();
            Assert.True(median > 0 && median * phase.GetProperty("passes").GetInt32() <= 2 * phase.GetProperty("seconds").GetDouble() + 1e-9, $"median pass {median} s");   // half the passes take ≥ the median
            // The speed quoted is the unprofiled passes' (median, and mean), each doing a profiled pass's tokens.
            var alone = phase.GetProperty("unprofiled_pass_seconds").EnumerateArray().Select(x => x.GetDouble()).Order().ToList();
            double perPass = phase.GetProperty("tokens").GetInt32() / (double)phase.GetProperty("passes").GetInt32();
            double aloneMedian = alone.Count % 2 == 1 ? alone[alone.Count / 2] : (alone[alone.Count / 2 - 1] + alone[alone.Count / 2]) / 2;
            Assert.Equal(aloneMedian, phase.GetProperty("unprofiled_median_pass_seconds").GetDouble(), 12);
            Assert.Equal(perPass / aloneMedian, phase.GetProperty("tok_s").GetDouble(), 6);
            Assert.Equal(perPass / alone.Average(), phase.GetProperty("mean_tok_s").GetDouble(), 6);
            Assert.Equal(median / aloneMedian - 1, phase.GetProperty("profiler_overhead").GetDouble(), 9);
        }
        double predicted = dec.GetProperty("predicted_tok_s").GetDouble();
        Assert.Equal(dec.GetProperty("tokens").GetInt32() / (dec.GetProperty("bytes").GetDouble() / (dec.GetProperty("bandwidth_gbps").GetDouble() * 1e9)), predicted, 6);
        // Decode here is one dispatch a step with barriers (a cache-resident model on 2 threads): each thread's mean wait
        // per step is reported, and happens inside the step (thread 0's inside its rows, thread 1's inside the dispatch).
        // The short prompt goes op by op: no barriers, nothing to report.
        var waits = dec.GetProperty("barrier_wait_seconds_per_pass").EnumerateArray().Select(w => w.GetDouble()).ToList();
        Assert.Equal(2, waits.Count);
        double meanStep = dec.GetProperty("seconds").GetDouble() / dec.GetProperty("passes").GetInt32();
        Assert.All(waits, w => Assert.True(w >= 0 && w <= meanStep, $"{w} s of waiting in a {meanStep} s step"));
        Assert.True(waits.Sum() > 0, "every barrier is timed, so some thread waited");
        Assert.Empty(pre.GetProperty("barrier_wait_seconds_per_pass").EnumerateArray());
        // Thread 0's waits are a row of their own, taken out of the op rows they fell in (no FLOPs, no bytes).
        var waitRow = dec.GetProperty("ops").EnumerateArray().Single(o => o.GetProperty("name").GetString() == ProfileReport.BarrierWaitName);
        Assert.Equal(waits[0] * dec.GetProperty("passes").GetInt32(), waitRow.GetProperty("seconds").GetDouble(), 9);
        Assert.Equal(0, waitRow.GetProperty("flops").GetDouble());
        Assert.Equal(0, waitRow.GetProperty("bytes").GetDouble());
        Assert.DoesNotContain(pre.GetProperty("ops").EnumerateArray(), o => o.GetProperty("name").GetString() == ProfileReport.BarrierWaitName);
        // Where a pass loses to its ceiling: one entry per op row, its median pass less its time at the roofline, largest first.
        foreach (var phase in new[] { pre, dec })
        {
            var rows = phase.GetProperty("ops").EnumerateArray().ToDictionary(o => o.GetProperty("name").GetString()!);
            var gap = phase.GetProperty("gap_seconds_per_pass").EnumerateArray().Select(g => (Name: g.GetProperty("name").GetString()!, S: g.GetProperty("seconds").GetDouble())).ToList();
            Assert.Equal(rows.Count, gap.Count);
            Assert.Equal(gap.Select(g => g.S).OrderDescending(), gap.Select(g => g.S));
            int passes = phase.GetProperty("passes").GetInt32();
            foreach (var (name, s) in gap)
            {
                double median = rows[name].GetProperty("median_pass_seconds").GetDouble();
                Assert.InRange(median, 0, rows[name].GetProperty("seconds").GetDouble());
                Assert.Equal(median - rows[name].GetProperty("roof_seconds").GetDouble() / passes, s, 12);
            }
        }
        // The ceiling sums each op at its roof: never above the phase taken as one op.
        foreach (var phase in new[] { pre, dec })
            Assert.True(phase.GetProperty("predicted_tok_s").GetDouble() <= phase.GetProperty("predicted_tok_s_whole_phase").GetDouble() * (1 + 1e-12));
    }

    [Fact]
    public void WeightStreamLoadsWithoutComputingAndLeavesTheModelIntact()
    {
        var dir = TestPaths.NewTempDir("stream");
        Assert.Equal(0, Run("synth", "--hidden", "64", "--layers", "2", "--ffn", "96", "--heads", "4", "--kv-heads", "2", "--vocab", "4096", "--context", "64", "--out", dir).Code);
        using var model = LlamaModel.Load(dir, threads: 2, maxTokens: 16);
        int[] ids = [1, 5, 9, 200];
        var before = new float[model.Config.VocabSize];
        using (var c = model.NewKvCache(8)) model.Forward(ids, 0, c, before);
        double g = model.MeasureWeightStreamGBps(reps: 3);
        Assert.True(g > 0 && double.IsFinite(g), $"{g} GB/s");
        Assert.Throws<ArgumentOutOfRangeException>(() => model.MeasureWeightStreamGBps(0));
        var after = new float[model.Config.VocabSize];
        using (var c = model.NewKvCache(8)) model.Forward(ids, 0, c, after);
        Assert.Equal(before, after);   // stream-only mode switched off again: real products
    }

    [Fact]
    public void CostModelCountsAHandCheckedStep()
    {
        // d=4, f=6, h=2, g=1, hd=2, V=10, one layer; a 3-token prefill: T=3, causal pairs = 3·3 − 3 = 6.
        var c = new LlamaConfig
        {
            HiddenSize = 4, IntermediateSize = 6, NumHiddenLayers = 1, NumAttentionHeads = 2, NumKeyValueHeads = 1,
            HeadDim = 2, VocabSize = 10, MaxPositionEmbeddings = 16, TieWordEmbeddings = true,
        };
        var ops = new CostModel(c, weightBytesPerElement: 4).Step([new StepSequence(3, 3)], logitRows: 1);
        OpCost Op(OpKind k) => ops.Single(o => o.Op == k);
        Assert.Equal(2 * 3 * 4 * 4, Op(OpKind.QProj).Flops);          // 2·T·d·h·hd
        Assert.Equal(4 * 4 * 4, Op(OpKind.QProj).WeightBytes);         // d·h·hd·4
        Assert.Equal(2 * 3 * 4 * 2, Op(OpKind.KProj).Flops);          // 2·T·d·g·hd
        Assert.Equal(3 * 2 * 4, Op(OpKind.KProj).KvWriteBytes);        // T·g·hd·4
        Assert.Equal(2 * 2 * 2 * 6, Op(OpKind.AttnScores).Flops);     // 2·h·hd·pairs
        Assert.Equal(3 * 2 * 4, Op(OpKind.AttnScores).KvReadBytes);    // ctx·g·hd·4
        var bf16Kv = new CostModel(c, weightBytesPerElement: 4, kvBytesPerElement: KvView.SizeOf(KvType.BF16)).Step([new StepSequence(3, 3)], logitRows: 1);
        Assert.Equal(3 * 2 * 2, bf16Kv.Single(o => o.Op == OpKind.KProj).KvWriteBytes);       // T·g·hd·2
        Assert.Equal(3 * 2 * 2, bf16Kv.Single(o => o.Op == OpKind.AttnScores).KvReadBytes);   // ctx·g·hd·2
        Assert.Equal(2 * 3 * 4 * 6, Op(OpKind.Gate).Flops);
        Assert.Equal(2 * 1 * 4 * 10, Op(OpKind.LmHead).Flops);        // one logit row
        Assert.Equal(10 * 4 * 4, Op(OpKind.LmHead).WeightBytes);
        var (flops, _, weights) = CostModel.Sum(ops);
        Assert.Equal(ops.Sum(o => o.Flops), flops);
        // every weight of the model is read once: embedding rows gathered (3·4·4), norms, projections, tied head
        Assert.Equal(3 * 4 * 4 + 2 * 4 * 4 + (4 * 4 + 2 * 4 * 2 + 4 * 4 + 3 * 4 * 6) * 4 + 4 * 4 + 10 * 4 * 4, weights);
    }

    [Theory]
    [InlineData(1, 4, 4, 10, 7, false)]
    [InlineData(2, 6, 3, 8, 13, true)]
    [InlineData(3, 8, 2, 6, 1, false)]
    public void CostModelCountsWhatTheNaiveReferenceDoes(int layers, int heads, int kv, int hd, int tokens, bool tied)
    {
        // The naive reference counts its own multiply-adds; the cost model must predict them exactly.
        var rm = new RandomModel(new RandomModelSpec { Layers = layers, Heads = heads, KvHeads = kv, HeadDim = hd, Tied = tied, Hidden = 20 + heads, Intermediate = 33 + hd },
            TestPaths.NewTempDir("count"));
        var naive = new NaiveLlama(rm);
        naive.Logits(Enumerable.Range(0, tokens).Select(i => 3 + i).ToArray());
        using var files = ModelFiles.Open(rm.Dir, requireTokenizer: false);
        var ops = new CostModel(files.Config, 4).Step([new StepSequence(tokens, tokens)], logitRows: tokens);   // the reference makes logits for every row
        double linear = ops.Where(o => o.Op is OpKind.QProj or OpKind.KProj or OpKind.VProj or OpKind.OProj or OpKind.Gate or OpKind.Up or OpKind.Down or OpKind.LmHead).Sum(o => o.Flops);
        double attention = ops.Where(o => o.Op is OpKind.AttnScores or OpKind.AttnValues).Sum(o => o.Flops);
        Assert.Equal(2.0 * naive.LinearMacs, linear);
        Assert.Equal(2.0 * naive.AttentionMacs, attention);
        // and the weight bytes of a step are every matrix once, the head once even when tied
        var (_, _, weightBytes) = CostModel.Sum(ops);
        long matrices = rm.Tensors.Where(t => t.Value.Shape.Length == 2 && t.Key != "model.embed_tokens.weight").Sum(t => t.Value.Values.LongLength)
            + (tied ? rm.Tensors["model.embed_tokens.weight"].Values.LongLength : 0);
        long norms = rm.Tensors.Where(t => t.Value.Shape.Length == 1).Sum(t => t.Value.Values.LongLength);
        Assert.Equal(4.0 * (matrices + norms + tokens * files.Config.HiddenSize), weightBytes);
    }
}
