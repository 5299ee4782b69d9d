using System.Text.Json;
using MiniLlm.Engine;

namespace MiniLlm.Tests;

/// <summary>tiny-kjv (fp32 and bf16) against expected.json from an independent PyTorch implementation.</summary>
public class ExpectedOutputTests
{
    public static TheoryData<string> Models => new() { "tiny-kjv", "tiny-kjv-bf16" };

    private sealed record Case(string Prompt, int[] PromptIds, int[] GreedyIds, double[] Margins, float[] LastLogits);

    private static List<Case> Cases(string model)
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(TestPaths.Model(model), "expected.json")));
        var list = new List<Case>();
        foreach (var c in doc.RootElement.GetProperty("cases").EnumerateArray())
            list.Add(new Case(
                c.GetProperty("prompt").GetString()!,
                c.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
                c.GetProperty("greedy_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
                c.GetProperty("greedy_margins").EnumerateArray().Select(e => e.GetDouble()).ToArray(),
                c.GetProperty(LogitsKey(c)).EnumerateArray().Select(e => e.GetSingle()).ToArray()));
        Assert.NotEmpty(list);
        return list;
    }

    private static string LogitsKey(JsonElement c)
    {
        foreach (var p in c.EnumerateObject())
            if (p.Name.Contains("logits")) return p.Name;
        throw new InvalidOperationException("expected.json case without logits");
    }

    [Theory]
    [MemberData(nameof(Models))]
    public void PromptIdsMatch(string model)
    {
        using var llm = LlamaModel.Load(TestPaths.Model(model));
        foreach (var c in Cases(model))
            Assert.Equal(c.PromptIds, llm.Tokenizer.Encode(c.Prompt));
    }

    [Theory]
    [MemberData(nameof(Models))]
    public void LastPositionLogitsMatch(string model)
    {
        using var llm = LlamaModel.Load(TestPaths.Model(model));
        var logits = new float[llm.Config.VocabSize];
        foreach (var c in Cases(model))
        {
            using var cache = llm.NewKvCache();
            llm.Forward(c.PromptIds, 0, cache, logits);
            Assert.Equal(c.LastLogits.Length, logits.Length);
            double maxRef = c.LastLogits.Max(MathF.Abs), maxErr = 0;
            for (int i = 0; i < logits.Length; i++) maxErr = Math.Max(maxErr, Math.Abs(logits[i] - c.LastLogits[i]));
            Assert.True(maxErr < 1e-4 * maxRef, $"{model} '{c.Prompt}': max abs error {maxErr:E3}, bound {1e-4 * maxRef:E3}");
        }
    }

    [Theory]
    [MemberData(nameof(Models))]
    public void GreedyIdsMatchUntilTheFirstNearTie(string model)
    {
        using var llm = LlamaModel.Load(TestPaths.Model(model));
        var gen = new Generator(llm);
        int compared = 0;
        foreach (var c in Cases(model))
        {
            var result = gen.Generate(c.PromptIds, new GenerationOptions { MaxTokens = c.GreedyIds.Length, Sampling = SamplingParams.Greedy });
            for (int i = 0; i < c.GreedyIds.Length; i++)
            {
                Assert.True(i < result.OutputIds.Length, $"{model} '{c.Prompt}': stopped after {result.OutputIds.Length} tokens, reference has {c.GreedyIds.Length}");
                Assert.True(c.GreedyIds[i] == result.OutputIds[i], $"{model} '{c.Prompt}': step {i} gave {result.OutputIds[i]}, reference {c.GreedyIds[i]} (margin {c.Margins[i]})");
                compared++;
                if (c.Margins[i] < 1e-3) break;  // beyond a near-tie another correct implementation may diverge
            }
        }
        Assert.True(compared > 50, $"only {compared} greedy steps compared");
    }
}
