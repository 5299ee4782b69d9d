using System.Diagnostics;

namespace MiniLlm.Engine;

public sealed record PerplexityResult(double Perplexity, double MeanNll, int Chunks, int ScoredTokens, double Seconds, IReadOnlyList<double> ChunkPerplexity);

/// <summary>
/// llama.cpp's perplexity convention: the text's tokens cut into non-overlapping windows of <c>context</c> tokens,
/// the first of each replaced by BOS, each window run once with logits at every position, and only the second half
/// of each window scored (each of those tokens then has at least context/2 tokens of history).
/// </summary>
public static class Perplexity
{
    public static PerplexityResult Compute(LlamaModel model, int[] tokens, int context, Action<int, int>? progress = null)
    {
        if (context < 4 || context > model.Context) throw new ArgumentException($"context must be in [4, {model.Context}], got {context}", "context");
        if (context > model.MaxTokens) throw new ArgumentException($"context {context} exceeds the model's batch of {model.MaxTokens}", "context");
        int chunks = tokens.Length / context;
        if (chunks == 0) throw new ArgumentException($"the text has {tokens.Length} tokens, fewer than one window of {context}", "file");
        int V = model.Config.VocabSize, first = context / 2;
        var logits = new float[(long)context * V];
        var window = new int[context];
        using var cache = model.NewKvCache(context);
        double nll = 0;
        int scored = 0;
        var perChunk = new List<double>(chunks);
        var clock = Stopwatch.StartNew();
        for (int c = 0; c < chunks; c++)
        {
            Array.Copy(tokens, c * context, window, 0, context);
            if (model.Config.BosTokenId is { } bos) window[0] = bos;
            model.Forward(window, 0, cache, logits, LogitsFor.AllTokens);
            double chunkNll = 0;
            for (int j = first; j < context - 1; j++)
            {
                var row = logits.AsSpan(j * V, V);
                float max = float.NegativeInfinity;
                foreach (var v in row) max = Math.Max(max, v);
                double sum = 0;
                foreach (var v in row) sum += Math.Exp(v - max);
                chunkNll += max + Math.Log(sum) - row[tokens[c * context + j + 1]];
            }
            int n = context - 1 - first;
            nll += chunkNll;
            scored += n;
            perChunk.Add(Math.Exp(chunkNll / n));
            progress?.Invoke(c + 1, chunks);
        }
        return new PerplexityResult(Math.Exp(nll / scored), nll / scored, chunks, scored, clock.Elapsed.TotalSeconds, perChunk);
    }
}
