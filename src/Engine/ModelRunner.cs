namespace MiniLlm.Engine;

/// <summary>
/// Runs one scheduled step: flattens every sequence's chunk into one token list so each linear layer is a single
/// GEMM over all of them (weights read once per step), attention per sequence over its own blocks, then samples
/// for each sequence whose known tokens are now all computed. Buffers grow once and are reused.
/// </summary>
public sealed class ModelRunner(LlamaModel model)
{
    private int[] _tokens = new int[64];
    private SequenceSlice[] _slices = new SequenceSlice[8];
    private float[] _logits = [];

    public LlamaModel Model => model;

    /// <summary>Runs the chunks and returns, per chunk, the sampled token or −1 (prefill not finished).</summary>
    public void Run(IReadOnlyList<ScheduledChunk> chunks, Span<int> sampled)
    {
        int total = 0;
        foreach (var c in chunks) total += c.Tokens;
        if (_tokens.Length < total) _tokens = new int[Math.Max(total, _tokens.Length * 2)];
        if (_slices.Length < chunks.Count) _slices = new SequenceSlice[Math.Max(chunks.Count, _slices.Length * 2)];
        int V = model.Config.VocabSize;
        if (_logits.Length < chunks.Count * V) _logits = new float[chunks.Count * V];

        int t = 0;
        for (int i = 0; i < chunks.Count; i++)
        {
            var (s, n) = chunks[i];
            for (int j = 0; j < n; j++) _tokens[t++] = s.Token(s.Computed + j);
            _slices[i] = new SequenceSlice(s.Computed, n, s.Cache);
        }
        model.Forward(_tokens.AsSpan(0, total), _slices.AsSpan(0, chunks.Count), _logits);

        for (int i = 0; i < chunks.Count; i++)
        {
            var (s, n) = chunks[i];
            s.Computed += n;
            sampled[i] = s.Computed == s.Length ? s.Sampler.Sample(_logits.AsSpan(i * V, V)) : -1;
        }
    }
}
