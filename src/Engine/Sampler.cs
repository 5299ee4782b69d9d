using System.Numerics.Tensors;

namespace MiniLlm.Engine;

/// <summary>
/// How to pick the next token. Temperature 0 is greedy. Otherwise: softmax(logits / T), keep the top-k, then the
/// smallest set whose probability reaches top-p, then those with p ≥ min-p · p_max; sample from what is left.
/// </summary>
public sealed record SamplingParams
{
    public float Temperature { get; init; } = 0.8f;
    /// <summary>0 = off.</summary>
    public int TopK { get; init; } = 40;
    /// <summary>1 = off.</summary>
    public float TopP { get; init; } = 0.95f;
    /// <summary>0 = off.</summary>
    public float MinP { get; init; } = 0.05f;
    /// <summary>Same seed, same model, same prompt ⇒ same text.</summary>
    public ulong Seed { get; init; } = 42;

    public static SamplingParams Greedy { get; } = new() { Temperature = 0, TopK = 0, TopP = 1, MinP = 0 };

    /// <summary>Throws <see cref="ArgumentException"/> naming the offending parameter.</summary>
    public void Validate()
    {
        if (!(Temperature >= 0) || float.IsInfinity(Temperature)) throw new ArgumentException($"temperature must be ≥ 0, got {Temperature}", "temperature");
        if (TopK < 0) throw new ArgumentException($"top-k must be ≥ 0 (0 = off), got {TopK}", "top-k");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentException($"top-p must be in (0, 1], got {TopP}", "top-p");
        if (!(MinP >= 0 && MinP <= 1)) throw new ArgumentException($"min-p must be in [0, 1], got {MinP}", "min-p");
    }
}

/// <summary>Vocabulary-sized buffers for sampling; samplers used one after another can share one.</summary>
public sealed class SamplerScratch(int vocab)
{
    internal readonly float[] Probs = new float[vocab];   // [V]
    internal readonly float[] Keys = new float[vocab];    // [V] −p, sort keys
    internal readonly int[] Ids = new int[vocab];         // [V]
}

/// <summary>Turns one row of logits into a token id. Holds its seeded RNG; allocates nothing per call.</summary>
public sealed class Sampler
{
    private readonly SamplingParams _p;
    private readonly float[] _probs, _keys;
    private readonly int[] _ids;
    private readonly Random _rng;

    public SamplingParams Params => _p;

    public Sampler(SamplingParams p, int vocab, SamplerScratch? scratch = null)
    {
        p.Validate();
        _p = p;
        scratch ??= new SamplerScratch(vocab);
        if (scratch.Probs.Length < vocab) throw new ArgumentException("scratch smaller than the vocabulary", nameof(scratch));
        _probs = scratch.Probs;
        _keys = scratch.Keys;
        _ids = scratch.Ids;
        _rng = new Random(unchecked((int)(p.Seed ^ (p.Seed >> 32))));
    }

    /// <summary>
    /// Compiles every path <see cref="Sample"/> takes with these parameters (tiered compilation is off: each method
    /// compiles at its first call) on a throwaway sampler, so no caller's RNG moves: over <paramref name="scratch"/>
    /// [vocab] filled with logits spread wide (a thousand candidates to sort) and then peaked (a few), as real ones are
    /// one or the other. All-equal logits skip the cut-offs: a first real sample then took 0.1-0.3 ms.
    /// </summary>
    public static void Compile(SamplingParams p, Span<float> scratch)
    {
        var warm = new Sampler(p, scratch.Length);
        for (int i = 0; i < scratch.Length; i++) scratch[i] = i * 7919 % 1009 * 0.01f;
        warm.Sample(scratch);
        for (int i = 0; i < scratch.Length; i++) scratch[i] = i % 17 == 0 ? 8 + i % 5 : i % 13 * 0.1f;
        warm.Sample(scratch);
    }

    public int Sample(ReadOnlySpan<float> logits)
    {
        if (_p.Temperature == 0) return TensorPrimitives.IndexOfMax(logits);
        int V = logits.Length;
        var probs = _probs.AsSpan(0, V);
        TensorPrimitives.Divide(logits, _p.Temperature, probs);
        TensorPrimitives.SoftMax(probs, probs);

        // Only tokens that can survive the filters need sorting: top-p can never keep one below (1 − top_p)/(V − 1),
        // min-p never one below min_p · p_max.
        float pmax = TensorPrimitives.Max(probs);
        float cutoff = Math.Max(_p.MinP * pmax, _p.TopP < 1 ? (1 - _p.TopP) / Math.Max(1, V - 1) : 0);
        int n = 0;
        for (int i = 0; i < V; i++)
            if (probs[i] >= cutoff) { _keys[n] = -probs[i]; _ids[n] = i; n++; }
        var keys = _keys.AsSpan(0, n);
        var ids = _ids.AsSpan(0, n);
        keys.Sort(ids);  // most probable first

        if (_p.TopK > 0 && _p.TopK < n) n = _p.TopK;
        if (_p.TopP < 1)
        {
            float cum = 0;
            for (int i = 0; i < n; i++)
            {
                cum -= keys[i];
                if (cum >= _p.TopP) { n = i + 1; break; }
            }
        }
        float total = 0;
        for (int i = 0; i < n; i++) total -= keys[i];
        float r = _rng.NextSingle() * total;
        float acc = 0;
        for (int i = 0; i < n; i++)
        {
            acc -= keys[i];
            if (r < acc) return ids[i];
        }
        return ids[n - 1]; // rounding: r landed at the very top
    }
}
