using MiniLlm.Kernels;

namespace MiniLlm.Engine;

/// <summary>One row of a profile: measured time against the work the cost model says was done.</summary>
/// <param name="MedianPassSeconds">For op rows of a profile with passes: the op's time in the median pass for that op
/// (<see cref="OpProfiler.MedianPassOpSeconds"/>); 0 when not known.</param>
public sealed record ProfileRow(string Name, double Seconds, double Share, double Flops, double Bytes, double MedianPassSeconds = 0)
{
    public double Gflops => Seconds > 0 ? Flops / Seconds / 1e9 : 0;
    public double GBps => Seconds > 0 ? Bytes / Seconds / 1e9 : 0;
    public double Intensity => Bytes > 0 ? Flops / Bytes : 0;
}

/// <summary>A phase (prefill or decode) measured per op and per layer, with its roofline verdict.</summary>
/// <param name="GemmGflops">The compute roof of the prediction: the model's GEMM kernel measured in this run at this
/// phase's rows per step (<see cref="LlamaModel.MeasureGemmGflops"/>); 0 means the FMA peak.</param>
/// <param name="Steps">Forward passes in the phase (0: not known, rates are means over <see cref="Seconds"/>).</param>
/// <param name="MedianStepSeconds">The median profiled pass's wall time: the phase's rates are quoted from it (when
/// no unprofiled passes were timed), as the bandwidth beside them is a median of samples taken between the same passes.</param>
/// <param name="UnprofiledStepSeconds">Passes of the same work timed with no profiler attached, taken in turn with the
/// profiled ones: when there are any, the phase's rates come from them (the engine's speed, not the instrumented one),
/// and <see cref="ProfilerOverhead"/> says what the Stopwatch reads added.</param>
public sealed record PhaseProfile(string Phase, int Tokens, double Seconds, double Flops, double Bytes, double WeightBytes,
    IReadOnlyList<ProfileRow> Ops, IReadOnlyList<ProfileRow> Layers, double BandwidthUsedGBps, string BandwidthSource, double GemmGflops = 0,
    int Steps = 0, double MedianStepSeconds = 0, IReadOnlyList<double>? BarrierWaitSecondsPerPass = null, IReadOnlyList<double>? UnprofiledStepSeconds = null)
{
    /// <summary>Per thread, seconds a pass spent waiting at its barriers (mean over the passes); empty when the passes had none.</summary>
    public IReadOnlyList<double> BarrierWaits => BarrierWaitSecondsPerPass ?? [];

    private bool Unprofiled => Steps > 0 && UnprofiledStepSeconds is { Count: > 0 };
    /// <summary>The median unprofiled pass (0 when none was timed).</summary>
    public double UnprofiledMedianStepSeconds => Unprofiled ? Ceilings.Median([.. UnprofiledStepSeconds!]) : 0;
    /// <summary>Median profiled pass ÷ median unprofiled pass − 1 (0 when no unprofiled pass was timed).</summary>
    public double ProfilerOverhead => Unprofiled && MedianStepSeconds > 0 ? MedianStepSeconds / UnprofiledMedianStepSeconds - 1 : 0;

    /// <summary>Seconds per token: the median pass's time over its tokens (unprofiled when timed) when passes were timed, else the mean.</summary>
    private double SecondsPerToken =>
        Unprofiled ? UnprofiledMedianStepSeconds * Steps / Tokens
        : Steps > 0 && MedianStepSeconds > 0 ? MedianStepSeconds * Steps / Tokens : Seconds / Tokens;
    /// <summary>Tokens/s of the median pass (every pass of a phase does the same work).</summary>
    public double TokensPerSecond => 1 / SecondsPerToken;
    /// <summary>Tokens/s over every pass's time, slow ones included (the unprofiled passes when timed).</summary>
    public double MeanTokensPerSecond => Unprofiled ? Tokens / (double)Steps / UnprofiledStepSeconds!.Average() : Tokens / Seconds;

    public double Gflops => Flops / Tokens / SecondsPerToken / 1e9;
    public double GBps => Bytes / Tokens / SecondsPerToken / 1e9;
    /// <summary>The FLOP/s the prediction divides by: the measured GEMM when there is one, else the FMA peak.</summary>
    public double ComputeRoofGflops(Roofline r) => GemmGflops > 0 ? Math.Min(GemmGflops, r.PeakGflops) : r.PeakGflops;
    /// <summary>
    /// Tokens/s the roofline allows. With op rows: tokens ÷ Σ over the ops of max(FLOPs ÷ compute roof, bytes ÷
    /// bandwidth) (<see cref="RoofSeconds"/>): the ops run one after another, so one op's bytes cannot hide under
    /// another's FLOPs (a prompt's LM head reads its whole matrix for one row while the projections are
    /// compute-bound). Without rows, the phase as a whole (<see cref="WholePhasePredictedTokensPerSecond"/>).
    /// </summary>
    public double PredictedTokensPerSecond(Roofline r) => Ops.Count > 0 ? Tokens / RoofSeconds(r).Total : WholePhasePredictedTokensPerSecond(r);

    /// <summary>The phase as one op: tokens ÷ max(FLOPs ÷ compute roof, bytes ÷ bandwidth), i.e. compute roof ÷
    /// FLOPs per token or bandwidth ÷ bytes per token. Never below <see cref="PredictedTokensPerSecond"/>.</summary>
    public double WholePhasePredictedTokensPerSecond(Roofline r) => Tokens / Math.Max(Flops / (ComputeRoofGflops(r) * 1e9), Bytes / (BandwidthUsedGBps * 1e9));

    /// <summary>Whether the phase as one op is set by its FLOPs (true) or by its bytes.</summary>
    public bool WholePhaseComputeBound(Roofline r) => Flops / ComputeRoofGflops(r) > Bytes / BandwidthUsedGBps;

    /// <summary>
    /// Seconds the phase's ops take at the roofline, split by which term set each op: Compute sums FLOPs ÷ compute
    /// roof of the ops whose FLOPs take longer than their bytes, Memory sums bytes ÷ bandwidth of the rest. One
    /// compute roof for every op, as in <see cref="WholePhasePredictedTokensPerSecond"/>, so the sum is never below it.
    /// </summary>
    public (double Compute, double Memory, double Total) RoofSeconds(Roofline r)
    {
        double compute = 0, memory = 0;
        foreach (var op in Ops)
        {
            var (c, m) = RoofTerms(op, r);
            if (c > m) compute += c; else memory += m;
        }
        return (compute, memory, compute + memory);
    }

    /// <summary>Seconds an op row takes at the roofline: max(FLOPs ÷ compute roof, bytes ÷ bandwidth).</summary>
    public double RoofSeconds(ProfileRow op, Roofline r)
    {
        var (c, m) = RoofTerms(op, r);
        return Math.Max(c, m);
    }

    private (double Compute, double Memory) RoofTerms(ProfileRow op, Roofline r) =>
        (op.Flops / (ComputeRoofGflops(r) * 1e9), op.Bytes / (BandwidthUsedGBps * 1e9));

    /// <summary>Whether the prediction is set by FLOPs (true) or by bytes: the larger of the two sums of <see cref="RoofSeconds"/>.</summary>
    public bool ComputeBound(Roofline r)
    {
        if (Ops.Count == 0) return WholePhaseComputeBound(r);
        var (c, m, _) = RoofSeconds(r);
        return c > m;
    }
    /// <summary>
    /// Where a pass loses to its ceiling, op by op: each op row's median time in a pass less its time at the roofline
    /// (<see cref="RoofSeconds(ProfileRow, Roofline)"/> per pass), largest first. An op above its roof (a long
    /// stream beating the phase's mean bandwidth) comes out negative. Empty without passes.
    /// </summary>
    public IReadOnlyList<(string Name, double Seconds)> GapPerPass(Roofline r)
    {
        if (Steps <= 0) return [];
        var gaps = new List<(string, double)>();
        foreach (var op in Ops) gaps.Add((op.Name, op.MedianPassSeconds - RoofSeconds(op, r) / Steps));
        gaps.Sort((a, b) => b.Item2.CompareTo(a.Item2));
        return gaps;
    }

    public double Mfu(Roofline r) => Gflops / r.PeakGflops;
    public double Mbu => GBps / BandwidthUsedGBps;
}

/// <summary>Builds profiles from an <see cref="OpProfiler"/> and the matching <see cref="CostModel"/> steps.</summary>
public static class ProfileReport
{
    /// <summary>
    /// The entry an op's time is recorded under. Ops that run as one kernel or one dispatch are timed together:
    /// attention scores, softmax and ·V (fused); q, k and v (one grouped GEMM/GEMV over the same X); gate and up.
    /// Timing them apart would mean running them apart, which is slower and not what an unprofiled pass does.
    /// </summary>
    public static OpKind Timed(OpKind k) => k switch
    {
        OpKind.Softmax or OpKind.AttnValues => OpKind.AttnScores,
        OpKind.KProj or OpKind.VProj => OpKind.QProj,
        OpKind.Up => OpKind.Gate,
        _ => k,
    };

    /// <summary>The row of thread 0's waits at the barriers of a one-dispatch pass (taken out of the op rows they fell in).</summary>
    public const string BarrierWaitName = "Barrier waits (thread 0)";

    /// <summary>The row name of a timed entry.</summary>
    public static string TimedName(OpKind k) => k switch
    {
        OpKind.AttnScores => "Attention (QKᵀ, softmax, ·V)",
        OpKind.QProj => "QKV projections",
        OpKind.Gate => "Gate + Up",
        _ => k.ToString(),
    };

    /// <param name="bandwidth">GB/s the phase's bytes are judged against (measured beside it), and where it came from.</param>
    /// <param name="unprofiled">Wall times of passes of the same work run with no profiler, if any (see <see cref="PhaseProfile"/>).</param>
    public static PhaseProfile Build(string phase, int tokens, OpProfiler prof, IEnumerable<OpCost> costs, int layers, Roofline roof, double bandwidth, string bandwidthSource, double gemmGflops = 0,
        IReadOnlyList<double>? unprofiled = null)
    {
        var all = costs.ToList();
        double total = prof.TotalSeconds;
        var ops = new List<ProfileRow>();
        foreach (var kind in Enum.GetValues<OpKind>())
        {
            if (Timed(kind) != kind) continue;
            var mine = all.Where(c => Timed(c.Op) == kind).ToList();
            double s = prof.Seconds(kind);
            if (s == 0 && mine.Count == 0) continue;
            ops.Add(new ProfileRow(TimedName(kind), s, s / total, mine.Sum(c => c.Flops), mine.Sum(c => c.Bytes), prof.MedianPassOpSeconds(kind)));
        }
        double waited = prof.OwnWaitSeconds();   // thread 0's barrier waits: no op's cost, so no FLOPs or bytes
        if (waited > 0) ops.Add(new ProfileRow(BarrierWaitName, waited, waited / total, 0, 0, prof.MedianPassOwnWaitSeconds()));
        var rows = new List<ProfileRow>();
        for (int l = -1; l < layers; l++)
        {
            double s = Enum.GetValues<OpKind>().Sum(k => prof.Seconds(k, l)) + prof.OwnWaitSeconds(l);
            var mine = all.Where(c => c.Layer == l).ToList();
            rows.Add(new ProfileRow(l < 0 ? "embedding + head" : $"layer {l}", s, s / total, mine.Sum(c => c.Flops), mine.Sum(c => c.Bytes)));
        }
        var (fl, by, wb) = CostModel.Sum(all);
        var waits = prof.Passes > 0 ? prof.WaitSeconds().Select(w => w / prof.Passes).ToArray() : [];
        return new PhaseProfile(phase, tokens, total, fl, by, wb, ops, rows, bandwidth, bandwidthSource, gemmGflops, prof.Passes, prof.MedianPassSeconds, waits, unprofiled);
    }

    /// <summary>"compute" or "memory" by the ridge, and the fraction of the roof at this row's intensity.</summary>
    public static (string Bound, double OfRoof) Verdict(ProfileRow r, Roofline roof, double bandwidth)
    {
        double ridge = roof.PeakGflops / bandwidth;
        double roofAt = Math.Min(roof.PeakGflops, r.Intensity * bandwidth);
        return (r.Intensity >= ridge ? "compute" : "memory", roofAt > 0 ? r.Gflops / roofAt : 0);
    }
}
