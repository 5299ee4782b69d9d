using MiniLlm.Kernels;
using System.Diagnostics;
using MiniLlm.Loader;

namespace MiniLlm.Engine;

/// <summary>Why generation ended.</summary>
public enum StopReason { Eos, MaxTokens, ContextFull }

public static class StopReasons
{
    public static string Name(StopReason r) => r switch
    {
        StopReason.Eos => "eos",
        StopReason.MaxTokens => "max_tokens",
        StopReason.ContextFull => "context_full",
        _ => r.ToString(),
    };
}

/// <summary>A prompt that does not fit the model's context.</summary>
public sealed class PromptTooLongException(string message) : Exception(message);

public sealed record GenerationOptions
{
    public int MaxTokens { get; init; } = 128;
    public SamplingParams Sampling { get; init; } = new();
    public bool StopAtEos { get; init; } = true;
    /// <summary>Element type of the KV cache (bf16: half the memory and attention bytes).</summary>
    public KvType KvType { get; init; } = KvType.F32;

    public void Validate()
    {
        if (MaxTokens <= 0) throw new ArgumentException($"max-tokens must be > 0, got {MaxTokens}", "max-tokens");
        Sampling.Validate();
    }
}

/// <summary>Wall-clock figures of one generation, in milliseconds.</summary>
public sealed record GenerationTimings(double PrefillMs, double TtftMs, double[] DecodeStepMs, double TotalMs)
{
    public double MedianDecodeMs => DecodeStepMs.Length == 0 ? double.NaN : Median(DecodeStepMs);

    private static double Median(double[] v)
    {
        var s = (double[])v.Clone();
        Array.Sort(s);
        return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }
}

public sealed record GenerationResult(int[] PromptIds, int[] OutputIds, string Text, StopReason StopReason, GenerationTimings Timings)
{
    public double PrefillTokensPerSecond => PromptIds.Length / (Timings.PrefillMs / 1000);
    /// <summary>From the median decode step, as engineers quote it (robust to a noisy step or two).</summary>
    public double DecodeTokensPerSecond => 1000 / Timings.MedianDecodeMs;
}

/// <summary>
/// One request at a time: prefill the prompt (in chunks of the model's batch size), then decode token by
/// token, sampling each from the last logits, streaming text as it becomes final.
/// </summary>
public sealed class Generator(LlamaModel model)
{
    public LlamaModel Model { get; } = model;

    /// <param name="onText">Called with each piece of text as soon as it is final (may be empty for partial UTF-8).</param>
    public GenerationResult Generate(string prompt, GenerationOptions options, Action<int, string>? onText = null)
    {
        var ids = Model.Tokenizer.Encode(prompt);
        return Generate(ids, options, onText);
    }

    /// <summary>When set, prefill and decode are timed per op into these (see <see cref="OpProfiler"/>).</summary>
    public OpProfiler? PrefillProfiler { get; set; }
    public OpProfiler? DecodeProfiler { get; set; }

    public GenerationResult Generate(int[] promptIds, GenerationOptions options, Action<int, string>? onText = null)
    {
        options.Validate();
        int ctx = Model.Context;
        if (promptIds.Length == 0) throw new ArgumentException("the prompt encodes to no tokens", "prompt");
        if (promptIds.Length >= ctx)
            throw new PromptTooLongException($"prompt is {promptIds.Length} tokens but the model's context is {ctx} (at most {ctx - 1} leave room for one new token)");

        var cfg = Model.Config;
        var tok = Model.Files.Tokenizer;
        var eos = new HashSet<int>(cfg.EosTokenIds);
        if (tok != null) eos.Add(tok.EosId);
        var sampler = new Sampler(options.Sampling, cfg.VocabSize);
        var logits = new float[cfg.VocabSize];
        var decoder = tok?.NewStreamingDecoder(continuation: true);
        var text = new System.Text.StringBuilder();
        using var cache = Model.NewKvCache(Math.Min(ctx, promptIds.Length + options.MaxTokens), options.KvType);
        Sampler.Compile(options.Sampling, logits);   // before the clock starts (the prefill overwrites the scratch)

        var output = new List<int>(options.MaxTokens);
        var steps = new List<double>(options.MaxTokens);
        var one = new int[1];

        var clock = Stopwatch.StartNew();
        Model.Profiler = PrefillProfiler;
        for (int done = 0; done < promptIds.Length; done += Model.MaxTokens)
        {
            int n = Math.Min(Model.MaxTokens, promptIds.Length - done);
            Model.Forward(promptIds.AsSpan(done, n), done, cache, logits);
        }
        Model.Profiler = DecodeProfiler;
        double prefillMs = clock.Elapsed.TotalMilliseconds;

        double ttft = 0;
        StopReason reason = StopReason.MaxTokens;
        int pos = promptIds.Length;
        while (true)
        {
            int next = sampler.Sample(logits);
            if (output.Count == 0) ttft = clock.Elapsed.TotalMilliseconds;
            output.Add(next);
            bool isEos = options.StopAtEos && eos.Contains(next);
            if (decoder != null && !isEos)
            {
                var piece = decoder.Next(next);
                text.Append(piece);
                onText?.Invoke(next, piece);
            }
            if (isEos) { reason = StopReason.Eos; break; }
            if (output.Count >= options.MaxTokens) { reason = StopReason.MaxTokens; break; }
            if (pos >= cache.Capacity) { reason = StopReason.ContextFull; break; }
            double t0 = clock.Elapsed.TotalMilliseconds;
            one[0] = next;
            Model.Forward(one, pos, cache, logits);
            pos++;
            steps.Add(clock.Elapsed.TotalMilliseconds - t0);
        }
        Model.Profiler = null;
        if (decoder != null)
        {
            var tail = decoder.Flush();
            if (tail.Length > 0) { text.Append(tail); onText?.Invoke(-1, tail); }
        }
        var timings = new GenerationTimings(prefillMs, ttft, steps.ToArray(), clock.Elapsed.TotalMilliseconds);
        return new GenerationResult(promptIds, output.ToArray(), text.ToString(), reason, timings);
    }
}
