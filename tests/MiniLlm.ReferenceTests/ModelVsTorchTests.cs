using MiniLlm.Engine;
using MiniLlm.Loader;
using MiniLlm.Tests;

namespace MiniLlm.ReferenceTests;

/// <summary>MiniLlm's logits at every position against the libtorch forward pass.</summary>
public class ModelVsTorchTests
{
    private static readonly string[] Prompts =
    [
        "And God said",
        "In the beginning God created the heaven and the earth.",
        "A fool and his money are soon parted; a wise man and his money are seldom",
    ];

    private static void AssertClose(float[] reference, float[] actual, string what)
    {
        Assert.Equal(reference.Length, actual.Length);
        double maxRef = reference.Max(MathF.Abs), maxErr = 0;
        for (int i = 0; i < reference.Length; i++) maxErr = Math.Max(maxErr, Math.Abs(reference[i] - actual[i]));
        Assert.True(maxErr < 1e-4 * maxRef, $"{what}: max abs error {maxErr:E3}, bound {1e-4 * maxRef:E3}");
    }

    private static void Compare(string dir, int[][] prompts, string what)
    {
        using var model = LlamaModel.Load(dir, threads: 2);
        using var torch = new TorchLlama(model.Files);
        int V = model.Config.VocabSize;
        foreach (var ids in prompts)
        {
            using var cache = model.NewKvCache();
            var logits = new float[ids.Length * V];
            model.Forward(ids, 0, cache, logits, LogitsFor.AllTokens);
            AssertClose(torch.Logits(ids), logits, $"{what}, {ids.Length}-token prompt");
        }
    }

    [Theory]
    [InlineData("tiny-kjv")]
    [InlineData("tiny-kjv-bf16")]
    public void TinyKjvMatchesTorchAtEveryPosition(string name)
    {
        var dir = TestPaths.Model(name);
        var tok = TextTokenizer.Load(Path.Combine(dir, "tokenizer.model"));
        Compare(dir, Prompts.Select(p => tok.Encode(p)).ToArray(), name);
    }

    public static TheoryData<string, int, int, bool, string, bool> Randoms => new()
    {
        { "gqa1-tied-f32", 4, 4, true, "F32", false },
        { "gqa2-untied-f32", 6, 3, false, "F32", false },
        { "gqa4-untied-f32", 8, 2, false, "F32", false },
        { "gqa2-tied-f16", 6, 3, true, "F16", false },
        { "gqa4-untied-bf16", 8, 2, false, "BF16", false },
        { "llama3-rope", 6, 3, false, "F32", true },
    };

    [Theory]
    [MemberData(nameof(Randoms))]
    public void RandomModelsMatchTorch(string name, int heads, int kv, bool tied, string dtype, bool llama3)
    {
        var rm = new RandomModel(new RandomModelSpec
        {
            Heads = heads, KvHeads = kv, Tied = tied, DType = dtype, Seed = name.Length * 31 + heads,
            Llama3Scaling = llama3 ? (8.0, 1.0, 4.0, 16) : null,
        }, TestPaths.NewTempDir("torch-" + name));
        var rng = new Random(5);
        int[][] prompts = [Enumerable.Range(0, 19).Select(_ => rng.Next(0, 97)).ToArray(), [1, 2, 3], [42]];
        Compare(rm.Dir, prompts, name);
    }

    [Fact]
    public void PagedBatchedDecodingFollowsTorchFullRecompute()
    {
        var dir = TestPaths.Model("tiny-kjv");
        using var model = LlamaModel.Load(dir, threads: 2, maxTokens: 64);
        using var torch = new TorchLlama(model.Files);
        using var engine = new LlmEngine(model, new EngineOptions { MaxBatchedTokens = 24, MaxSeqs = 8 });
        var ids = Prompts.Select(p => engine.AddRequest(model.Tokenizer.Encode(p), SamplingParams.Greedy, 20, stopAtEos: false)).ToList();
        engine.RunToCompletion();
        int V = model.Config.VocabSize, checkedSteps = 0;
        foreach (var id in ids)
        {
            var s = engine.Get(id);
            var all = s.Prompt.Concat(s.Output).ToArray();
            var logits = torch.Logits(all[..^1]);   // full recompute over everything the engine saw
            for (int i = 0; i < s.Output.Count; i++)
            {
                var row = logits.AsSpan((s.Prompt.Length - 1 + i) * V, V).ToArray();
                var order = row.Select((v, j) => (v, j)).OrderByDescending(t => t.v).ToArray();
                if (order[0].v - order[1].v < 1e-3) break;   // a near-tie: either token is a correct answer
                Assert.True(order[0].j == s.Output[i], $"request {id} step {i}: engine chose {s.Output[i]}, torch's argmax is {order[0].j}");
                checkedSteps++;
            }
        }
        Assert.True(checkedSteps > 30, $"only {checkedSteps} steps compared");
    }
}
