using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using MiniLlm.Engine;
using MiniLlm.Loader;
using Spectre.Console;

namespace MiniLlm.Cli;

/// <summary><c>minillm batch</c>: many prompts through the continuous-batching engine, with latency and throughput figures.</summary>
public static class BatchCommand
{
    private sealed record Request(int Line, string Prompt, GenerationOptions Options);

    public static Command Create(CliIO io)
    {
        var prompts = new Option<string>("--prompts") { Description = "JSONL file: one object per line with \"prompt\" and optional max_tokens, temperature, top_k, top_p, min_p, seed", Required = true };
        var model = CommonOptions.Model();
        var maxSeqs = new Option<int>("--max-seqs") { Description = "Most sequences running at once", DefaultValueFactory = _ => 64 };
        var maxBatched = new Option<int>("--max-batched-tokens") { Description = "Token budget per step (prefill chunks + decode tokens)", DefaultValueFactory = _ => 512 };
        var kvMemory = new Option<string?>("--kv-memory") { Description = "KV pool size: bytes (e.g. 64M, 2G) or a fraction of free RAM (e.g. 0.25); default: room for max-seqs full contexts" };
        var kvDtype = CommonOptions.KvDtype();
        var noPrefix = new Option<bool>("--no-prefix-cache") { Description = "Turn prefix caching off" };
        var rate = new Option<double>("--request-rate") { Description = "Poisson arrivals at this many requests/s (seeded); 0 = all at once", DefaultValueFactory = _ => 0 };
        var seed = new Option<ulong>("--seed") { Description = "Seed for arrivals and for requests without their own", DefaultValueFactory = _ => 0 };
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Default max tokens per request", DefaultValueFactory = _ => 64 };
        var sloTtft = new Option<double>("--slo-ttft-ms") { Description = "TTFT target for goodput", DefaultValueFactory = _ => 0 };
        var sloTpot = new Option<double>("--slo-tpot-ms") { Description = "TPOT target for goodput", DefaultValueFactory = _ => 0 };
        var outFile = new Option<string?>("--out") { Description = "Write the per-request JSON lines here (default: stdout)" };
        var threads = CommonOptions.Threads();
        var weights = CommonOptions.Weights();
        var mmap = CommonOptions.Mmap();
        var deterministic = new Option<bool>("--deterministic") { Description = "Batch-invariant kernels: each output independent of what it was batched with" };
        var cmd = new Command("batch", "Run many prompts through the continuous-batching engine")
        {
            prompts, model, maxSeqs, maxBatched, kvMemory, kvDtype, noPrefix, rate, seed, maxTokens, sloTtft, sloTpot, outFile, threads, deterministic, weights, mmap,
        };
        cmd.SetAction(r =>
        {
            int t = RooflineCommand.ResolveThreads(r.GetValue(threads));
            if (r.GetValue(rate) < 0) throw new ArgumentException("request-rate must be ≥ 0", "request-rate");
            var requests = ReadPrompts(r.GetValue(prompts)!, r.GetValue(maxTokens), r.GetValue(seed));
            var dir = ModelLocator.Resolve(r.GetValue(model));
            int budget = r.GetValue(maxBatched);
            using var llm = LlamaModel.Load(dir, t, maxTokens: Math.Max(1, budget), format: CommonOptions.Format(r.GetValue(weights)!), mapWeights: r.GetValue(mmap));
            llm.BatchInvariant = r.GetValue(deterministic);
            var options = new EngineOptions
            {
                MaxSeqs = r.GetValue(maxSeqs),
                MaxBatchedTokens = budget,
                PrefixCaching = !r.GetValue(noPrefix),
                KvMemoryBytes = ParseMemory(r.GetValue(kvMemory)),
                KvType = CommonOptions.KvType(r.GetValue(kvDtype)!),
            };
            llm.Warmup(options.KvType);
            using var engine = new LlmEngine(llm, options);
            var tok = llm.Tokenizer;
            var encoded = requests.Select(q => tok.Encode(q.Prompt)).ToArray();

            // Arrival times: all at once, or a seeded Poisson process.
            var arrivals = new double[requests.Count];
            if (r.GetValue(rate) > 0)
            {
                var rng = new Random(unchecked((int)r.GetValue(seed)));
                double at = 0;
                for (int i = 0; i < arrivals.Length; i++) { at += -Math.Log(1 - rng.NextDouble()) / r.GetValue(rate); arrivals[i] = at; }
            }

            var idToRequest = new Dictionary<int, int>();
            var clock = Stopwatch.StartNew();
            int next = 0;
            void Admit()
            {
                while (next < requests.Count && arrivals[next] <= clock.Elapsed.TotalSeconds)
                {
                    var o = requests[next].Options;
                    try { idToRequest[engine.AddRequest(encoded[next], o.Sampling, o.MaxTokens)] = next; }
                    catch (RequestRejectedException e) { throw new RequestRejectedException($"{r.GetValue(prompts)} line {requests[next].Line}: {e.Message}"); }
                    next++;
                }
            }
            void Loop(Action<int>? progress)
            {
                while (next < requests.Count || engine.HasWork)
                {
                    Admit();
                    if (!engine.HasWork)
                    {
                        var wait = arrivals[next] - clock.Elapsed.TotalSeconds;
                        if (wait > 0) Thread.Sleep(TimeSpan.FromSeconds(Math.Min(wait, 0.05)));
                        continue;
                    }
                    engine.Step();
                    progress?.Invoke(engine.Finished.Count);
                }
            }
            if (!Console.IsErrorRedirected && io.Err == Console.Error)
            {
                var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });
                console.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
                    .Start(ctx =>
                    {
                        var task = ctx.AddTask($"{requests.Count} requests", maxValue: requests.Count);
                        Loop(done => task.Value = done);
                    });
            }
            else Loop(null);
            double seconds = clock.Elapsed.TotalSeconds;

            using (var sink = r.GetValue(outFile) is { } path ? new StreamWriter(path) : null)
            {
                var w = sink ?? io.Out;
                foreach (var s in engine.Finished.OrderBy(s => idToRequest[s.Id]))
                    w.WriteLine(RequestJson(s, requests[idToRequest[s.Id]], tok));
            }
            io.Err.WriteLine(Summary(engine, seconds, r.GetValue(sloTtft), r.GetValue(sloTpot)));
            return ExitCodes.Ok;
        });
        return cmd;
    }

    private static List<Request> ReadPrompts(string path, int defaultMaxTokens, ulong seed)
    {
        if (!File.Exists(path)) throw new ArgumentException($"{path}: prompts file not found", "prompts");
        var list = new List<Request>();
        int line = 0;
        foreach (var text in File.ReadLines(path))
        {
            line++;
            if (string.IsNullOrWhiteSpace(text)) continue;
            try
            {
                using var doc = JsonDocument.Parse(text);
                var o = doc.RootElement;
                if (o.ValueKind != JsonValueKind.Object || !o.TryGetProperty("prompt", out var p) || p.ValueKind != JsonValueKind.String)
                    throw new ArgumentException($"{path} line {line}: needs a string field \"prompt\"", "prompts");
                float F(string k, float d) => o.TryGetProperty(k, out var v) ? v.GetSingle() : d;
                int I(string k, int d) => o.TryGetProperty(k, out var v) ? v.GetInt32() : d;
                var g = new GenerationOptions
                {
                    MaxTokens = I("max_tokens", defaultMaxTokens),
                    Sampling = new SamplingParams
                    {
                        Temperature = F("temperature", 0), TopK = I("top_k", 0), TopP = F("top_p", 1), MinP = F("min_p", 0),
                        Seed = o.TryGetProperty("seed", out var sd) ? sd.GetUInt64() : seed + (ulong)line,
                    },
                };
                try { g.Validate(); }
                catch (ArgumentException e) { throw new ArgumentException($"{path} line {line}: {e.Message}", "prompts"); }
                list.Add(new Request(line, p.GetString()!, g));
            }
            catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException)
            {
                throw new ArgumentException($"{path} line {line}: not a valid JSON request ({e.Message})", "prompts");
            }
        }
        if (list.Count == 0) throw new ArgumentException($"{path}: no requests", "prompts");
        return list;
    }

    /// <summary>"64M", "2G", "123456" (bytes) or "0.25" (fraction of available memory).</summary>
    public static long ParseMemory(string? s)
    {
        if (string.IsNullOrWhiteSpace(s)) return 0;
        s = s.Trim();
        if (s.Contains('.') && double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double frac) && frac > 0 && frac <= 1)
            return (long)(frac * GC.GetGCMemoryInfo().TotalAvailableMemoryBytes);
        long mult = char.ToUpperInvariant(s[^1]) switch { 'K' => 1L << 10, 'M' => 1L << 20, 'G' => 1L << 30, _ => 1 };
        if (mult > 1) s = s[..^1];
        if (long.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out long n) && n > 0) return n * mult;
        throw new ArgumentException($"kv-memory '{s}' is neither a byte count (e.g. 512M) nor a fraction in (0, 1]", "kv-memory");
    }

    private static string RequestJson(Sequence s, Request q, TextTokenizer tok)
    {
        using var ms = new MemoryStream();
        using (var j = new Utf8JsonWriter(ms))
        {
            j.WriteStartObject();
            j.WriteNumber("id", s.Id);
            j.WriteNumber("line", q.Line);
            j.WriteString("prompt", q.Prompt);
            j.WritePropertyName("output_ids");
            JsonSerializer.Serialize(j, s.Output);
            var dec = tok.NewStreamingDecoder(continuation: true);
            var text = string.Concat(s.Output.Where(t => t != tok.EosId).Select(dec.Next)) + dec.Flush();
            j.WriteString("text", text);
            j.WriteString("stop_reason", s.Finish switch
            {
                FinishReason.Eos => "eos", FinishReason.MaxTokens => "max_tokens", FinishReason.ContextFull => "context_full", _ => "cancelled",
            });
            j.WriteStartObject("metrics");
            j.WriteNumber("prompt_tokens", s.Prompt.Length);
            j.WriteNumber("output_tokens", s.Output.Count);
            j.WriteNumber("cached_tokens", s.CachedTokens);
            j.WriteNumber("preemptions", s.Preemptions);
            j.WriteNumber("queue_ms", s.QueueMs);
            j.WriteNumber("ttft_ms", s.TtftMs);
            j.WriteNumber("tpot_ms", s.TpotMs);
            j.WriteNumber("e2e_ms", s.E2eMs);
            j.WriteEndObject();
            j.WriteEndObject();
        }
        return System.Text.Encoding.UTF8.GetString(ms.ToArray());
    }

    private static double Percentile(List<double> sorted, double p) =>
        sorted.Count == 0 ? 0 : sorted[Math.Min(sorted.Count - 1, (int)Math.Ceiling(p / 100 * sorted.Count) - 1 < 0 ? 0 : (int)Math.Ceiling(p / 100 * sorted.Count) - 1)];

    public static string Summary(LlmEngine e, double seconds, double sloTtft, double sloTpot)
    {
        var done = e.Finished;
        var ttft = done.Select(s => s.TtftMs).Order().ToList();
        var tpot = done.Where(s => s.Output.Count > 1).Select(s => s.TpotMs).Order().ToList();
        long outTokens = done.Sum(s => (long)s.Output.Count);
        long promptTokens = done.Sum(s => (long)s.Prompt.Length), cached = done.Sum(s => (long)s.CachedTokens);
        int good = done.Count(s => (sloTtft <= 0 || s.TtftMs <= sloTtft) && (sloTpot <= 0 || s.TpotMs <= sloTpot));
        string I(double v) => v.ToString("F1", CultureInfo.InvariantCulture);
        return string.Join(Environment.NewLine,
            $"requests: {done.Count} in {I(seconds)} s = {I(done.Count / seconds)} req/s; output {outTokens} tokens = {I(outTokens / seconds)} tok/s (total), {e.Steps} steps",
            $"TTFT ms  p50 {I(Percentile(ttft, 50))}  p90 {I(Percentile(ttft, 90))}  p99 {I(Percentile(ttft, 99))}",
            $"TPOT ms  p50 {I(Percentile(tpot, 50))}  p90 {I(Percentile(tpot, 90))}  p99 {I(Percentile(tpot, 99))}",
            $"preemptions {e.Scheduler.Preemptions}; prefix cache: {e.Blocks.PrefixHits}/{e.Blocks.PrefixLookups} block lookups hit, {cached}/{promptTokens} prompt tokens reused; KV pool {e.Pool.Blocks} blocks ({e.Pool.Bytes / 1048576.0:F1} MiB)",
            $"goodput {I(good / seconds)} req/s ({good}/{done.Count} met" +
            (sloTtft > 0 ? $" TTFT ≤ {sloTtft} ms" : "") + (sloTpot > 0 ? $" TPOT ≤ {sloTpot} ms" : "") + (sloTtft <= 0 && sloTpot <= 0 ? " no SLO given" : "") + ")");
    }
}
