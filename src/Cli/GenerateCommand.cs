using System.CommandLine;
using System.Text.Json;
using MiniLlm.Engine;
using MiniLlm.Loader;

namespace MiniLlm.Cli;

/// <summary><c>minillm generate</c>: stream a completion and say how fast it ran.</summary>
public static class GenerateCommand
{
    public static Command Create(CliIO io)
    {
        var prompt = new Option<string>("--prompt", "-p") { Description = "Text to continue", Required = true };
        var model = CommonOptions.Model();
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Most tokens to generate", DefaultValueFactory = _ => 128 };
        var temperature = new Option<float>("--temperature") { Description = "Sampling temperature; 0 = greedy", DefaultValueFactory = _ => 0.8f };
        var topK = new Option<int>("--top-k") { Description = "Keep the k most probable tokens (0 = off)", DefaultValueFactory = _ => 40 };
        var topP = new Option<float>("--top-p") { Description = "Nucleus sampling mass in (0, 1] (1 = off)", DefaultValueFactory = _ => 0.95f };
        var minP = new Option<float>("--min-p") { Description = "Drop tokens below min-p × the top probability (0 = off)", DefaultValueFactory = _ => 0.05f };
        var seed = new Option<ulong?>("--seed", "-s") { Description = "Random seed (default: a fresh one, reported in the JSON output)" };
        var threads = CommonOptions.Threads();
        var output = CommonOptions.Output();
        var weights = CommonOptions.Weights();
        var mmap = CommonOptions.Mmap();
        var q8Act = CommonOptions.Q8Activations();
        var kvDtype = CommonOptions.KvDtype();
        var profile = new Option<bool>("--profile") { Description = "Time every op per layer, prefill and decode separately, and print where the time went" };
        var noWarmup = new Option<bool>("--no-warmup") { Description = "Skip the untimed warm-up pass (then TTFT includes JIT compilation)" };

        var cmd = new Command("generate", "Generate text from a prompt, streaming it, then print the speed")
        {
            prompt, model, maxTokens, temperature, topK, topP, minP, seed, threads, output, weights, mmap, q8Act, kvDtype, noWarmup, profile,
        };
        cmd.SetAction(r =>
        {
            var options = new GenerationOptions
            {
                MaxTokens = r.GetValue(maxTokens),
                KvType = CommonOptions.KvType(r.GetValue(kvDtype)!),
                Sampling = new SamplingParams
                {
                    Temperature = r.GetValue(temperature),
                    TopK = r.GetValue(topK),
                    TopP = r.GetValue(topP),
                    MinP = r.GetValue(minP),
                    Seed = r.GetValue(seed) ?? (ulong)Random.Shared.NextInt64(),
                },
            };
            options.Validate();  // bad arguments fail before the model is loaded
            int t = r.GetValue(threads);
            if (t < 0) throw new ArgumentException($"threads must be ≥ 0 (0 = one per core), got {t}", "threads");
            bool json = r.GetValue(output) == "json";
            string text = r.GetValue(prompt)!;

            var dir = ModelLocator.Resolve(r.GetValue(model));
            using var llm = LlamaModel.Load(dir, t, format: CommonOptions.Format(r.GetValue(weights)!), mapWeights: r.GetValue(mmap));
            llm.Q8Int8Activations = r.GetValue(q8Act) == "int8";
            if (!r.GetValue(noWarmup)) llm.Warmup(options.KvType);
            var gen = new Generator(llm);
            bool profiling = r.GetValue(profile);
            if (profiling)
            {
                gen.PrefillProfiler = new OpProfiler(llm.Config.NumHiddenLayers);
                gen.DecodeProfiler = new OpProfiler(llm.Config.NumHiddenLayers);
            }
            if (!json) { io.Out.Write(text); io.Out.Flush(); }
            var result = gen.Generate(text, options, json ? null : (_, piece) => { io.Out.Write(piece); io.Out.Flush(); });
            if (json) WriteJson(io.Out, dir, llm, options, result);
            else
            {
                io.Out.WriteLine();
                io.Out.WriteLine(Summary(result));
            }
            if (profiling && !json) io.Out.Write(OpTimes(gen.PrefillProfiler!, gen.DecodeProfiler!));
            return ExitCodes.Ok;
        });
        return cmd;
    }

    public static string Summary(GenerationResult r)
    {
        var t = r.Timings;
        string decode = t.DecodeStepMs.Length == 0 ? "n/a" : $"{r.DecodeTokensPerSecond:F1} tok/s ({t.MedianDecodeMs:F2} ms/token median)";
        return $"[prompt {r.PromptIds.Length} tokens | generated {r.OutputIds.Length} tokens | stop: {StopReasons.Name(r.StopReason)} | " +
               $"TTFT {t.TtftMs:F1} ms | prefill {r.PrefillTokensPerSecond:F1} tok/s | decode {decode}]";
    }

    /// <summary>Per-op wall time of prefill and decode (ms, share); `minillm profile` adds FLOPs, bytes and the roofline.</summary>
    public static string OpTimes(OpProfiler prefill, OpProfiler decode)
    {
        var sb = new System.Text.StringBuilder();
        sb.AppendLine($"{"op",-14} {"prefill ms",11} {"share",7} {"decode ms/token",16} {"share",7}");
        double pt = prefill.TotalSeconds, dt = decode.TotalSeconds;
        int steps = Math.Max(1, decode.Passes);
        foreach (var op in Enum.GetValues<OpKind>())
        {
            double p = prefill.Seconds(op), d = decode.Seconds(op);
            if (p == 0 && d == 0) continue;
            sb.AppendLine($"{(op == OpKind.AttnScores ? "Attention" : op.ToString()),-14} {p * 1000,11:F3} {100 * p / Math.Max(pt, 1e-12),6:F1}% {d * 1000 / steps,16:F4} {100 * d / Math.Max(dt, 1e-12),6:F1}%");
        }
        double pw = prefill.OwnWaitSeconds(), dw = decode.OwnWaitSeconds();   // thread 0 at the one-dispatch pass's barriers
        if (pw > 0 || dw > 0)
            sb.AppendLine($"{"BarrierWaits",-14} {pw * 1000,11:F3} {100 * pw / Math.Max(pt, 1e-12),6:F1}% {dw * 1000 / steps,16:F4} {100 * dw / Math.Max(dt, 1e-12),6:F1}%");
        sb.AppendLine($"{"total",-14} {pt * 1000,11:F3} {"",7} {dt * 1000 / steps,16:F4}   ({decode.Passes} decode steps; `minillm profile` sets these against the roofline)");
        return sb.ToString();
    }

    private static void WriteJson(TextWriter w, string dir, LlamaModel llm, GenerationOptions o, GenerationResult r)
    {
        using var ms = new MemoryStream();
        using (var j = new Utf8JsonWriter(ms, new JsonWriterOptions { Indented = false }))
        {
            j.WriteStartObject();
            j.WriteString("model", dir);
            j.WritePropertyName("prompt_ids");
            JsonSerializer.Serialize(j, r.PromptIds);
            j.WritePropertyName("output_ids");
            JsonSerializer.Serialize(j, r.OutputIds);
            j.WriteString("text", r.Text);
            j.WriteString("stop_reason", StopReasons.Name(r.StopReason));
            j.WriteStartObject("sampling");
            j.WriteNumber("temperature", o.Sampling.Temperature);
            j.WriteNumber("top_k", o.Sampling.TopK);
            j.WriteNumber("top_p", o.Sampling.TopP);
            j.WriteNumber("min_p", o.Sampling.MinP);
            j.WriteNumber("seed", o.Sampling.Seed);
            j.WriteNumber("max_tokens", o.MaxTokens);
            j.WriteEndObject();
            j.WriteString("kv_dtype", CommonOptions.KvName(o.KvType));
            j.WriteStartObject("timings");
            j.WriteNumber("prefill_ms", r.Timings.PrefillMs);
            j.WriteNumber("ttft_ms", r.Timings.TtftMs);
            j.WriteNumber("decode_median_ms", double.IsNaN(r.Timings.MedianDecodeMs) ? 0 : r.Timings.MedianDecodeMs);
            j.WritePropertyName("decode_step_ms");
            JsonSerializer.Serialize(j, r.Timings.DecodeStepMs);
            j.WriteNumber("total_ms", r.Timings.TotalMs);
            j.WriteNumber("prefill_tok_s", r.PrefillTokensPerSecond);
            j.WriteNumber("decode_tok_s", r.Timings.DecodeStepMs.Length == 0 ? 0 : r.DecodeTokensPerSecond);
            j.WriteEndObject();
            j.WriteNumber("threads", llm.Threads);
            j.WriteEndObject();
        }
        w.WriteLine(System.Text.Encoding.UTF8.GetString(ms.ToArray()));
    }
}
