using MiniLlm.Engine;

namespace MiniLlm.Tests;

/// <summary>The engine against the independent double-precision reference on random-weight models written here.</summary>
public class NaiveReferenceTests
{
    public static TheoryData<string, int, int, bool, string> Shapes => new()
    {
        // name, heads, kvHeads (GQA ratio 1, 2, 4), tied, dtype
        { "gqa1-untied-f32", 4, 4, false, "F32" },
        { "gqa2-tied-f32", 6, 3, true, "F32" },
        { "gqa4-untied-f32", 8, 2, false, "F32" },
        { "gqa2-untied-bf16", 6, 3, false, "BF16" },
        { "gqa4-tied-bf16", 8, 2, true, "BF16" },
        { "gqa1-tied-f16", 4, 4, true, "F16" },
        { "gqa2-untied-f16", 6, 3, false, "F16" },
    };

    private static readonly int[] Prompt = [1, 5, 17, 96, 3, 3, 44, 80, 12, 9, 60, 2, 33];

    private static RandomModel Make(string name, int heads, int kv, bool tied, string dtype, (double, double, double, int)? scaling = null) =>
        new(new RandomModelSpec { Heads = heads, KvHeads = kv, Tied = tied, DType = dtype, Llama3Scaling = scaling, Seed = name.GetHashCode() & 0xffff },
            TestPaths.NewTempDir(name));

    /// <summary>max |a − b| over everything must stay under 1e-4 × max |reference logit|.</summary>
    private static void AssertClose(double[] reference, ReadOnlySpan<float> actual, string what)
    {
        double maxRef = reference.Max(Math.Abs), maxErr = 0;
        for (int i = 0; i < reference.Length; i++) maxErr = Math.Max(maxErr, Math.Abs(reference[i] - actual[i]));
        Assert.True(maxErr < 1e-4 * maxRef, $"{what}: max abs error {maxErr:E3} vs bound {1e-4 * maxRef:E3}");
    }

    [Theory]
    [MemberData(nameof(Shapes))]
    public void AllPositionLogitsMatchReference(string name, int heads, int kv, bool tied, string dtype)
    {
        var rm = Make(name, heads, kv, tied, dtype);
        var reference = new NaiveLlama(rm).Logits(Prompt);
        foreach (int threads in new[] { 1, 2, 3 })
        {
            using var model = LlamaModel.Load(rm.Dir, threads);
            using var cache = model.NewKvCache();
            int V = rm.Spec.Vocab;
            var logits = new float[Prompt.Length * V];
            model.Forward(Prompt, 0, cache, logits, LogitsFor.AllTokens);
            for (int t = 0; t < Prompt.Length; t++)
                AssertClose(reference[t], logits.AsSpan(t * V, V), $"{name} threads={threads} position {t}");
        }
    }

    [Theory]
    [InlineData(WeightFormat.Stored)]
    [InlineData(WeightFormat.Q8)]
    public void WeightsReadInPlaceOrCopiedGiveIdenticalLogits(WeightFormat format)
    {
        var rm = Make("mapped-vs-copied", 8, 2, false, "BF16");
        float[] Run(bool mapped)
        {
            using var model = LlamaModel.Load(rm.Dir, threads: 2, format: format, mapWeights: mapped);
            Assert.Equal(mapped, model.WeightsMapped);
            using var cache = model.NewKvCache();
            var logits = new float[Prompt.Length * rm.Spec.Vocab];
            model.Forward(Prompt, 0, cache, logits, LogitsFor.AllTokens);
            return logits;
        }
        Assert.Equal(Run(true), Run(false));
    }

    [Theory]
    [MemberData(nameof(Shapes))]
    public void ChunkedPrefillAndDecodeMatchReference(string name, int heads, int kv, bool tied, string dtype)
    {
        var rm = Make(name, heads, kv, tied, dtype);
        var reference = new NaiveLlama(rm).Logits(Prompt);
        // Chunks of 4 through a model whose batch is 4, then the rest one token at a time (decode).
        using var model = LlamaModel.Load(rm.Dir, threads: 2, maxTokens: 4);
        using var cache = model.NewKvCache();
        int V = rm.Spec.Vocab;
        var logits = new float[V];
        int pos = 0;
        while (pos < 8)
        {
            model.Forward(Prompt.AsSpan(pos, 4), pos, cache, logits);
            pos += 4;
            AssertClose(reference[pos - 1], logits, $"{name} after chunk ending at {pos - 1}");
        }
        for (; pos < Prompt.Length; pos++)
        {
            model.Forward(Prompt.AsSpan(pos, 1), pos, cache, logits);
            AssertClose(reference[pos], logits, $"{name} decode position {pos}");
        }
    }

    [Fact]
    public void Llama3RopeScalingMatchesReference()
    {
        // original context 16 so that the 10-dim head's frequencies fall in all three bands (scaled, smoothed, kept).
        var rm = Make("llama3-rope", 6, 3, false, "F32", (8.0, 1.0, 4.0, 16));
        var reference = new NaiveLlama(rm).Logits(Prompt);
        using var model = LlamaModel.Load(rm.Dir, threads: 2);
        using var cache = model.NewKvCache();
        int V = rm.Spec.Vocab;
        var logits = new float[Prompt.Length * V];
        model.Forward(Prompt, 0, cache, logits, LogitsFor.AllTokens);
        for (int t = 0; t < Prompt.Length; t++) AssertClose(reference[t], logits.AsSpan(t * V, V), $"llama3 position {t}");
    }

    [Fact]
    public void Llama3ScalingActuallyChangesTheOutput()
    {
        // Guards the test above against a scaling that is silently ignored.
        var plain = Make("rope-plain", 6, 3, false, "F32");
        var scaled = new RandomModel(plain.Spec with { Llama3Scaling = (8.0, 1.0, 4.0, 16) }, TestPaths.NewTempDir("rope-scaled"));
        var a = new NaiveLlama(plain).Logits(Prompt)[^1];
        var b = new NaiveLlama(scaled).Logits(Prompt)[^1];
        Assert.True(a.Zip(b).Max(p => Math.Abs(p.First - p.Second)) > 1e-3);
    }

    [Theory]
    [InlineData("batch-f32", "F32")]
    [InlineData("batch-bf16", "BF16")]
    public void MixedBatchGivesEachSequenceItsOwnLogits(string name, string dtype)
    {
        var rm = Make(name, 8, 2, false, dtype);
        var reference = new NaiveLlama(rm);
        int[][] prompts = [Prompt, [1, 90, 91, 92, 93, 94, 95, 96, 4], [1, 7], [1, 20, 30, 40, 50, 60]];
        var refs = prompts.Select(p => reference.Logits(p)).ToArray();
        using var model = LlamaModel.Load(rm.Dir, threads: 2, maxTokens: 32);
        int V = rm.Spec.Vocab;
        var caches = prompts.Select(_ => model.NewKvCache()).ToArray();
        try
        {
            // Step 1: everyone prefills part of their prompt (different lengths) in one batch.
            int[] done = [5, 3, 1, 6];
            var logits = new float[prompts.Length * V];
            var tokens = prompts.SelectMany((p, i) => p.Take(done[i])).ToArray();
            var slices = prompts.Select((p, i) => new SequenceSlice(0, done[i], caches[i])).ToArray();
            model.Forward(tokens, slices, logits);
            for (int i = 0; i < prompts.Length; i++) AssertClose(refs[i][done[i] - 1], logits.AsSpan(i * V, V), $"{name} seq {i} step 1");

            // Then mixed steps: unfinished prompts advance by chunks of up to 3, finished ones decode one token.
            while (done.Select((n, i) => n < prompts[i].Length).Any(b => b))
            {
                var active = Enumerable.Range(0, prompts.Length).Where(i => done[i] < prompts[i].Length).ToArray();
                var counts = active.Select(i => Math.Min(3, prompts[i].Length - done[i])).ToArray();
                tokens = active.SelectMany((i, k) => prompts[i].Skip(done[i]).Take(counts[k])).ToArray();
                slices = active.Select((i, k) => new SequenceSlice(done[i], counts[k], caches[i])).ToArray();
                model.Forward(tokens, slices, logits);
                for (int k = 0; k < active.Length; k++)
                {
                    int i = active[k];
                    done[i] += counts[k];
                    AssertClose(refs[i][done[i] - 1], logits.AsSpan(k * V, V), $"{name} seq {i} at {done[i] - 1}");
                }
            }
        }
        finally { foreach (var c in caches) c.Dispose(); }
    }
}
