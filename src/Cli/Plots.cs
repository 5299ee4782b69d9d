using MiniLlm.Engine;
using MiniLlm.Kernels;
using ScottPlot;

namespace MiniLlm.Cli;

/// <summary>The pictures a person looks at: a roofline with every op, per-layer time, throughput against batch size.</summary>
public static class Plots
{
    private static readonly Color PrefillColor = Color.FromHex("#1f77b4");
    private static readonly Color DecodeColor = Color.FromHex("#ff7f0e");
    private static readonly Color WaitColor = Color.FromHex("#b0b0b0");   // barrier waits: grey, not an op

    private static void Save(Plot plt, string dir, string name, int w = 1000, int h = 650)
    {
        Directory.CreateDirectory(dir);
        plt.SavePng(Path.Combine(dir, name + ".png"), w, h);
        plt.SaveSvg(Path.Combine(dir, name + ".svg"), w, h);
    }

    /// <summary>Axes in log10 with labels in plain numbers.</summary>
    private static void LogAxes(Plot plt)
    {
        foreach (var axis in new ScottPlot.IAxis[] { plt.Axes.Bottom, plt.Axes.Left })
            axis.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic
            {
                MinorTickGenerator = new ScottPlot.TickGenerators.LogMinorTickGenerator(),
                IntegerTicksOnly = true,
                LabelFormatter = v => Math.Pow(10, v) is var x && x >= 1 ? x.ToString("G4") : x.ToString("G2"),
            };
    }

    /// <summary>Roofline (log–log): the compute roof, the DRAM roof (and decode's measured weight-stream roof, if different), every op as a point.</summary>
    public static void Roofline(string dir, string name, Roofline roof, PhaseProfile prefill, PhaseProfile decode)
    {
        var plt = new Plot();
        double lo = 0.01, hi = 1000;
        void Roof(double bw, string label, Color color)
        {
            var xs = Enumerable.Range(0, 200).Select(i => lo * Math.Pow(hi / lo, i / 199.0)).ToArray();
            var line = plt.Add.ScatterLine(xs.Select(Math.Log10).ToArray(), xs.Select(x => Math.Log10(Math.Min(roof.PeakGflops, x * bw))).ToArray());
            line.LegendText = label;
            line.LineWidth = 2;
            line.Color = color;
        }
        Roof(roof.BandwidthGBps, $"roof: {roof.PeakGflops:F0} GFLOP/s, DRAM {roof.BandwidthGBps:F1} GB/s (ridge {roof.Ridge:F1})", Colors.Black);
        if (Math.Abs(decode.BandwidthUsedGBps - roof.BandwidthGBps) > 1)
            Roof(decode.BandwidthUsedGBps, $"decode's roof: {decode.BandwidthUsedGBps:F0} GB/s, its weights read op by op beside it " +
                 (decode.BandwidthSource.StartsWith("last-level", StringComparison.Ordinal) ? "(they fit in the LLC)" : "(from DRAM)"), Colors.Gray);
        foreach (var (p, color) in new[] { (prefill, PrefillColor), (decode, DecodeColor) })
        {
            var pts = p.Ops.Where(o => o.Flops > 0 && o.Seconds > 0).ToList();
            var sc = plt.Add.ScatterPoints(pts.Select(o => Math.Log10(o.Intensity)).ToArray(), pts.Select(o => Math.Log10(o.Gflops)).ToArray());
            sc.Color = color;
            sc.MarkerSize = 9;
            string tokens = p.Steps > 1 && p.Tokens / p.Steps > 1 ? $"{p.Steps} passes of {p.Tokens / p.Steps} tokens" : $"{p.Tokens} tokens";
            sc.LegendText = $"{p.Phase} ops ({tokens}, {p.TokensPerSecond:F0} tok/s)";
            foreach (var o in pts.Where(o => o.Share > 0.08))
            {
                var t = plt.Add.Text(o.Name.Split(' ')[0], Math.Log10(o.Intensity), Math.Log10(o.Gflops));
                t.LabelFontSize = 11;
                t.LabelFontColor = color;
            }
        }
        LogAxes(plt);
        plt.Axes.SetLimits(Math.Log10(lo), Math.Log10(hi), Math.Log10(0.1), Math.Log10(roof.PeakGflops * 2));
        plt.Title($"Roofline: {roof.Cpu}, {roof.Threads} threads");
        plt.XLabel("arithmetic intensity (FLOP/byte)");
        plt.YLabel("achieved GFLOP/s");
        plt.ShowLegend(Alignment.UpperLeft);
        Save(plt, dir, name);
    }

    /// <summary>Decode time per layer, stacked by op.</summary>
    public static void LayerBars(string dir, string name, OpProfiler prof, string title)
    {
        var plt = new Plot();
        var kinds = Enum.GetValues<OpKind>().Where(k => prof.Seconds(k) > 0).ToList();
        var palette = new ScottPlot.Palettes.Category20();
        var bars = new List<Bar>();
        for (int l = -1; l < prof.Layers; l++)
        {
            double baseMs = 0;
            for (int i = 0; i < kinds.Count; i++)
            {
                double ms = prof.Seconds(kinds[i], l) * 1000 / Math.Max(1, prof.Passes);
                if (ms <= 0) continue;
                bars.Add(new Bar { Position = l + 1, ValueBase = baseMs, Value = baseMs + ms, FillColor = palette.GetColor(i) });
                baseMs += ms;
            }
            double waitMs = prof.OwnWaitSeconds(l) * 1000 / Math.Max(1, prof.Passes);
            if (waitMs > 0) bars.Add(new Bar { Position = l + 1, ValueBase = baseMs, Value = baseMs + waitMs, FillColor = WaitColor });
        }
        plt.Add.Bars(bars);
        for (int i = 0; i < kinds.Count; i++)
            plt.Legend.ManualItems.Add(new LegendItem { LabelText = ProfileReport.TimedName(kinds[i]), FillColor = palette.GetColor(i) });
        if (prof.OwnWaitSeconds() > 0) plt.Legend.ManualItems.Add(new LegendItem { LabelText = ProfileReport.BarrierWaitName, FillColor = WaitColor });
        plt.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(
            Enumerable.Range(0, prof.Layers + 1).Select(i => (double)i).ToArray(),
            Enumerable.Range(0, prof.Layers + 1).Select(i => i == 0 ? "emb+head" : $"L{i - 1}").ToArray());
        plt.Title(title);
        plt.YLabel("ms per step");
        plt.ShowLegend(Edge.Right);
        plt.Axes.Margins(bottom: 0);
        Save(plt, dir, name, 1150);
    }

    /// <summary>Total decode tok/s against batch size, with the roofline's prediction.</summary>
    public static void BatchSweep(string dir, string name, IReadOnlyList<BenchResult> results, Roofline roof, string model)
    {
        var plt = new Plot();
        var xs = results.Select(r => Math.Log2(r.Batch)).ToArray();
        var measured = plt.Add.Scatter(xs, results.Select(r => r.MeanTokensPerSecond).ToArray());
        measured.LegendText = "measured";
        measured.Color = DecodeColor;
        measured.LineWidth = 2;
        measured.MarkerSize = 8;
        var bound = plt.Add.Scatter(xs, results.Select(r => r.BoundTokensPerSecond(roof)).ToArray());
        bound.LegendText = "roofline bound min(B·BW/bytes, peak/FLOPs)";
        bound.Color = Colors.Gray;
        bound.LineWidth = 2;
        if (results.All(r => r.ProbeMedianGBps > 0))
        {
            var probed = plt.Add.Scatter(xs, results.Select(r => r.ProbeBoundTokensPerSecond(roof)).ToArray());
            probed.LegendText = "same bound, bandwidth probed beside each batch size";
            probed.Color = Colors.Gray;
            probed.LinePattern = LinePattern.Dashed;
            probed.LineWidth = 1.5f;
        }
        plt.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(xs, results.Select(r => r.Batch.ToString()).ToArray());
        plt.Title($"Decode throughput vs batch: {model}");
        plt.XLabel("batch size (sequences decoded together)");
        plt.YLabel("total tok/s");
        plt.ShowLegend(Alignment.UpperLeft);
        Save(plt, dir, name);
    }
}
