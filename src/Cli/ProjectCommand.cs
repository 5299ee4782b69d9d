using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using MiniLlm.Engine;
using MiniLlm.Loader;

namespace MiniLlm.Cli;

/// <summary><c>minillm project</c>: what the same model would do on a GPU, from its roofline.</summary>
public static class ProjectCommand
{
    public static Command Create(CliIO io)
    {
        var model = new Option<string?>("--model", "-m") { Description = "Model directory (its config.json) to project" };
        var config = new Option<string?>("--config") { Description = $"A published config instead: {string.Join(", ", KnownConfigs.All.Keys)}" };
        var hardware = new Option<string>("--hardware") { Description = $"{string.Join(", ", HardwareProfile.BuiltIn.Keys)}, or a JSON file", DefaultValueFactory = _ => "h100" };
        var dtype = new Option<string>("--dtype") { Description = "Weight precision", DefaultValueFactory = _ => "bf16" }.AcceptOnlyFromAmong("bf16", "fp16", "fp8", "int4", "fp32");
        var prompt = new Option<int>("--prompt-tokens") { Description = "Prompt length", DefaultValueFactory = _ => 512 };
        var gen = new Option<int>("--gen-tokens") { Description = "Tokens generated per request", DefaultValueFactory = _ => 128 };
        var batch = new Option<string>("--batch") { Description = "Batch sizes, comma-separated", DefaultValueFactory = _ => "1,2,4,8,16,32,64,128,256" };
        var ce = new Option<double>("--compute-efficiency") { Description = "Fraction of peak FLOP/s achieved (default 1: the roofline ceiling; 0.5–0.7 is typical)", DefaultValueFactory = _ => 1.0 };
        var be = new Option<double>("--bandwidth-efficiency") { Description = "Fraction of peak bandwidth achieved (default 1: the ceiling; 0.8–0.9 is typical)", DefaultValueFactory = _ => 1.0 };
        var ttft = new Option<double>("--ttft-target-ms") { Description = "TTFT target used to size --max-num-batched-tokens", DefaultValueFactory = _ => 500 };
        var output = CommonOptions.Output();
        var cmd = new Command("project", "Project TTFT, TPOT and throughput of a model on a GPU (or any roofline), with vllm serve arguments")
        {
            model, config, hardware, dtype, prompt, gen, batch, ce, be, ttft, output,
        };
        cmd.SetAction(r =>
        {
            string name;
            LlamaConfig c;
            if (r.GetValue(config) is { } cn) { c = KnownConfigs.Get(cn); name = cn; }
            else
            {
                var dir = ModelLocator.Resolve(r.GetValue(model));
                c = LlamaConfig.Load(Path.Combine(dir, "config.json"));
                name = Path.GetFileName(dir.TrimEnd('/'));
            }
            var hw = HardwareProfile.Resolve(r.GetValue(hardware)!);
            var batches = r.GetValue(batch)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(x => int.TryParse(x, out int b) && b > 0 ? b : throw new ArgumentException($"--batch expects positive integers, got '{x}'", "batch")).ToList();
            var p = Projection.Run(name, c, hw, r.GetValue(dtype)!, r.GetValue(prompt), r.GetValue(gen), batches, r.GetValue(ce), r.GetValue(be), r.GetValue(ttft));
            io.Out.Write(r.GetValue(output) == "json" ? Json(p) : Text(p));
            return ExitCodes.Ok;
        });
        return cmd;
    }

    private static string F(double v, string f = "F1") => v.ToString(f, CultureInfo.InvariantCulture);

    private static string Text(ProjectionResult p)
    {
        var sb = new StringBuilder();
        var hw = p.Hardware;
        sb.AppendLine($"{p.Model} ({F(p.ParametersB, "F2")}B parameters, {p.DType}: {F(p.WeightBytes / 1e9)} GB of weights) on {hw.Description}");
        sb.AppendLine($"roofs: {F(hw.PeakFlops(p.DType) / 1e12)} TFLOP/s dense × {p.ComputeEfficiency}, {F(hw.BandwidthTBps, "F2")} TB/s × {p.BandwidthEfficiency} ({hw.Source})");
        string knee = p.ComputeBoundBatch > 0 ? $"decode turns compute-bound at batch ≈ {p.ComputeBoundBatch}"
            : "decode never turns compute-bound (each sequence's KV reads grow with the batch as fast as its FLOPs)";
        string fit = p.MaxBatchByKv > 0 ? $"at most {p.MaxBatchByKv} sequences fit" : $"the weights alone exceed {hw.MemoryGB} GB: needs several devices";
        sb.AppendLine($"ridge {F(p.RidgeFlopsPerByte, "F0")} FLOP/byte; {knee}; KV {F(p.KvBytesPerSequence / 1e6)} MB per {p.PromptTokens + p.GenTokens}-token sequence → {fit}");
        sb.AppendLine($"prompt {p.PromptTokens} tokens, {p.GenTokens} generated (decode figures at context {p.PromptTokens + p.GenTokens / 2})");
        sb.AppendLine();
        sb.AppendLine($"{"batch",6} {"TTFT ms",10} {"TPOT ms",10} {"tok/s total",12} {"FLOP/byte",10} {"bound",8}{"",2}note");
        foreach (var row in p.Rows)
            sb.AppendLine($"{row.Batch,6} {F(row.TtftMs, "F2"),10} {F(row.TpotMs, "F2"),10} {F(row.DecodeTokensPerSecond),12} {F(row.Intensity, "F1"),10} {row.Bound,8}" +
                          (p.MaxBatchByKv > 0 && row.Batch > p.MaxBatchByKv ? "  exceeds KV capacity" : ""));
        sb.AppendLine();
        sb.AppendLine("vllm serve arguments these numbers imply:");
        foreach (var (flag, value, why) in p.VllmArgs) sb.AppendLine($"  {flag} {value}   # {why}");
        return sb.ToString();
    }

    private static string Json(ProjectionResult p) => JsonSerializer.Serialize(new
    {
        model = p.Model, hardware = p.Hardware.Name, dtype = p.DType, parameters_b = p.ParametersB, weight_gb = p.WeightBytes / 1e9,
        prompt_tokens = p.PromptTokens, gen_tokens = p.GenTokens, compute_efficiency = p.ComputeEfficiency, bandwidth_efficiency = p.BandwidthEfficiency,
        ridge_flop_per_byte = p.RidgeFlopsPerByte, compute_bound_batch = p.ComputeBoundBatch, max_batch_by_kv = p.MaxBatchByKv,
        rows = p.Rows.Select(r => new { batch = r.Batch, ttft_ms = r.TtftMs, tpot_ms = r.TpotMs, decode_tok_s = r.DecodeTokensPerSecond, bound = r.Bound, flop_per_byte = r.Intensity }),
        vllm_args = p.VllmArgs.Select(a => new { flag = a.Flag, value = a.Value, why = a.Why }),
    }, new JsonSerializerOptions { WriteIndented = true }) + "\n";
}
