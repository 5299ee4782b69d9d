using System.Diagnostics;
using MiniLlm.Kernels;

namespace MiniLlm.Engine;

/// <summary>One benchmark row: a test repeated, with the work it did (from <see cref="CostModel"/>).</summary>
/// <param name="ProbeGBps">Decode tests: the read-bandwidth probe timed on the model's own threads just before each
/// repetition — the bandwidth of the same minute, on a host where it drifts 2× between minutes. Empty for prefill.</param>
public sealed record BenchResult(string Test, int Batch, int TokensPerRep, double[] Seconds, double Flops, double Bytes, double WeightBytes, double[]? ProbeGBps = null)
{
    public double[] TokensPerSecond => Seconds.Select(s => TokensPerRep / s).ToArray();
    public double MeanTokensPerSecond => TokensPerSecond.Average();
    public double SdTokensPerSecond
    {
        get
        {
            var v = TokensPerSecond;
            if (v.Length < 2) return 0;
            double m = v.Average();
            return Math.Sqrt(v.Sum(x => (x - m) * (x - m)) / (v.Length - 1));
        }
    }
    public double MedianSeconds
    {
        get
        {
            var s = Seconds.Order().ToArray();
            return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
        }
    }
    public double Gflops => Flops / MedianSeconds / 1e9;
    public double GBps => Bytes / MedianSeconds / 1e9;

    /// <summary>Tokens/s the roofline allows for this work: tokens / max(FLOPs / peak, bytes / bandwidth).</summary>
    public double BoundTokensPerSecond(Roofline r) => Bound(r.PeakGflops, r.BandwidthGBps);

    /// <summary>Median of <see cref="ProbeGBps"/>, or 0 when no probe ran.</summary>
    public double ProbeMedianGBps => ProbeGBps is { Length: > 0 } p ? p.Order().ElementAt(p.Length / 2) : 0;

    /// <summary>The same bound with the bandwidth probed between repetitions (the run's FMA peak); 0 when no probe ran.</summary>
    public double ProbeBoundTokensPerSecond(Roofline r) => ProbeMedianGBps > 0 ? Bound(r.PeakGflops, ProbeMedianGBps) : 0;

    private double Bound(double gflops, double gbps) => TokensPerRep / Math.Max(Flops / (gflops * 1e9), Bytes / (gbps * 1e9));
}

/// <summary>
/// llama-bench's two tests on a loaded model: ppN (prefill N tokens from an empty cache) and tgN (N decode
/// steps from position 1, for a batch of B sequences at once). Tokens are fixed pseudo-random ids; no sampling.
/// </summary>
public static class Benchmark
{
    public static BenchResult Prefill(LlamaModel m, int tokens, int reps, KvType kv = KvType.F32)
    {
        if (tokens < 1 || tokens > m.Context) throw new ArgumentException($"prompt length {tokens} must be in [1, {m.Context}] (the model's context)", "p");
        var ids = Tokens(m, tokens, 1);
        var logits = new float[m.Config.VocabSize];
        using var cache = m.NewKvCache(tokens, kv);
        var times = new double[reps];
        for (int r = -1; r < reps; r++)   // r = −1: untimed warm-up
        {
            var sw = Stopwatch.StartNew();
            for (int done = 0; done < tokens; done += m.MaxTokens)
            {
                int n = Math.Min(m.MaxTokens, tokens - done);
                m.Forward(ids.AsSpan(done, n), done, cache, logits);
            }
            if (r >= 0) times[r] = sw.Elapsed.TotalSeconds;
        }
        var cost = CostModel.For(m, kv);
        // Chunks of MaxTokens: sum each chunk's cost.
        double fl = 0, by = 0, wb = 0;
        for (int done = 0; done < tokens; done += m.MaxTokens)
        {
            int n = Math.Min(m.MaxTokens, tokens - done);
            var (f, b, w) = CostModel.Sum(cost.Step([new StepSequence(n, done + n)], 1));
            fl += f; by += b; wb += w;
        }
        return new BenchResult($"pp{tokens}", 1, tokens, times, fl, by, wb);
    }

    /// <param name="probe">When given, timed on the model's threads before every repetition (<see cref="BenchResult.ProbeGBps"/>).</param>
    public static BenchResult Generate(LlamaModel m, int steps, int batch, int reps, Ceilings.ReadProbe? probe = null, KvType kv = KvType.F32)
    {
        if (steps < 1 || steps + 1 > m.Context) throw new ArgumentException($"generation length {steps} must be in [1, {m.Context - 1}]", "n");
        if (batch < 1 || batch > m.MaxTokens) throw new ArgumentException($"batch {batch} must be in [1, {m.MaxTokens}]", "b");
        var caches = Enumerable.Range(0, batch).Select(_ => m.NewKvCache(steps + 1, kv)).ToArray();
        try
        {
            int V = m.Config.VocabSize;
            var logits = new float[batch * V];
            var tokens = new int[batch];
            var slices = new SequenceSlice[batch];
            var times = new double[reps];
            var probes = new List<double>();
            var start = Tokens(m, batch, 2);
            for (int r = -1; r < reps; r++)
            {
                if (probe != null && r >= 0) probes.Add(m.MeasureReadBandwidth(probe));
                // Position 0 for everyone (untimed), then `steps` timed decode steps.
                for (int b = 0; b < batch; b++) { tokens[b] = start[b]; slices[b] = new SequenceSlice(0, 1, caches[b]); }
                m.Forward(tokens, slices, logits);
                var sw = Stopwatch.StartNew();
                for (int s = 1; s <= steps; s++)
                {
                    for (int b = 0; b < batch; b++)
                    {
                        tokens[b] = Ops.ArgMax(logits.AsSpan(b * V, V));
                        slices[b] = new SequenceSlice(s, 1, caches[b]);
                    }
                    m.Forward(tokens, slices, logits);
                }
                if (r >= 0) times[r] = sw.Elapsed.TotalSeconds;
            }
            var cost = CostModel.For(m, kv);
            double fl = 0, by = 0, wb = 0;
            for (int s = 1; s <= steps; s++)
            {
                var (f, bb, w) = cost.Decode(batch, s + 1);
                fl += f; by += bb; wb += w;
            }
            return new BenchResult(batch == 1 ? $"tg{steps}" : $"tg{steps} b{batch}", batch, steps * batch, times, fl, by, wb, probes.ToArray());
        }
        finally { foreach (var c in caches) c.Dispose(); }
    }

    /// <summary>n seeded random token ids, BOS first where the model has one (llama-bench's synthetic prompts).</summary>
    public static int[] Tokens(LlamaModel m, int n, int seed)
    {
        var rng = new Random(seed);
        var ids = new int[n];
        for (int i = 0; i < n; i++) ids[i] = rng.Next(3, m.Config.VocabSize);
        if (n > 0 && m.Config.BosTokenId is { } bos) ids[0] = bos;
        return ids;
    }
}
