using System.Text.Json;
using MiniLlm.Cli;

namespace MiniLlm.Tests;

/// <summary>The minillm command in-process: real runs, and every bad input giving one clear line and a non-zero exit.</summary>
public class CliTests
{
    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int code = CliApp.Run(args, o, e);
        return (code, o.ToString(), e.ToString());
    }

    [Fact]
    public void GenerateGreedyJsonMatchesTheReference()
    {
        var (code, stdout, stderr) = Run("generate", "--prompt", "And God said", "--temperature", "0", "--max-tokens", "12", "--output", "json", "--threads", "2");
        Assert.True(code == 0, stderr);
        using var doc = JsonDocument.Parse(stdout);
        var r = doc.RootElement;
        Assert.Equal([1, 324, 434, 425], r.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal([4003, 300, 538, 262, 384, 4007, 13, 1841, 262, 384, 425, 353], r.GetProperty("output_ids").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal("max_tokens", r.GetProperty("stop_reason").GetString());
        Assert.StartsWith(", I am the LORD.", r.GetProperty("text").GetString());
        Assert.True(r.GetProperty("timings").GetProperty("ttft_ms").GetDouble() > 0);
        Assert.Equal("f32", r.GetProperty("kv_dtype").GetString());
    }

    [Fact]
    public void GenerateWithABf16KvCacheKeepsTheGreedyTokens()
    {
        // Keys and values rounded to bf16 move the logits far less than these 12 greedy steps' top-1/top-2 margins
        // (0.16 and up in tiny-kjv's expected.json), so the tokens stay those of the fp32 reference.
        var (code, stdout, stderr) = Run("generate", "--prompt", "And God said", "--temperature", "0", "--max-tokens", "12", "--output", "json", "--threads", "2", "--kv-dtype", "bf16");
        Assert.True(code == 0, stderr);
        using var doc = JsonDocument.Parse(stdout);
        var r = doc.RootElement;
        Assert.Equal("bf16", r.GetProperty("kv_dtype").GetString());
        Assert.Equal([4003, 300, 538, 262, 384, 4007, 13, 1841, 262, 384, 425, 353], r.GetProperty("output_ids").EnumerateArray().Select(e => e.GetInt32()));
    }

    [Fact]
    public void GenerateStreamsTextAndEndsWithASummary()
    {
        var (code, stdout, stderr) = Run("generate", "--prompt", "And God said", "--max-tokens", "8", "--seed", "3");
        Assert.True(code == 0, stderr);
        var lines = stdout.TrimEnd().Split('\n');
        Assert.StartsWith("And God said", stdout);
        Assert.Matches(@"^\[prompt 4 tokens \| generated \d+ tokens \| stop: \w+ \| TTFT [\d.]+ ms \| prefill [\d.]+ tok/s \| decode .*tok/s", lines[^1]);
    }

    [Fact]
    public void SameSeedSameText()
    {
        string[] args = ["generate", "--prompt", "The fool", "--max-tokens", "20", "--seed", "1234", "--temperature", "1.0", "--output", "json"];
        var a = JsonDocument.Parse(Run(args).Out).RootElement.GetProperty("output_ids").GetRawText();
        var b = JsonDocument.Parse(Run(args).Out).RootElement.GetProperty("output_ids").GetRawText();
        Assert.Equal(a, b);
    }

    [Fact]
    public void InfoPrintsConfigParametersAndTensors()
    {
        var (code, stdout, stderr) = Run("info");
        Assert.True(code == 0, stderr);
        Assert.Contains("5,770,496", stdout);
        Assert.Contains("model.layers.5.mlp.down_proj.weight", stdout);
        Assert.Contains("F32", stdout);
    }

    [Theory]
    [InlineData("max-tokens", "generate", "--prompt", "x", "--max-tokens", "0")]
    [InlineData("max-tokens", "generate", "--prompt", "x", "--max-tokens", "-5")]
    [InlineData("temperature", "generate", "--prompt", "x", "--temperature", "-1")]
    [InlineData("top-p", "generate", "--prompt", "x", "--top-p", "0")]
    [InlineData("top-p", "generate", "--prompt", "x", "--top-p", "1.5")]
    [InlineData("min-p", "generate", "--prompt", "x", "--min-p", "3")]
    [InlineData("no-such-model", "generate", "--prompt", "x", "--model", "no-such-model")]
    [InlineData("no-such-model", "info", "--model", "no-such-model")]
    public void BadArgumentsGiveOneLineNamingTheCulprit(string culprit, params string[] args)
    {
        var (code, _, stderr) = Run(args);
        Assert.NotEqual(0, code);
        Assert.Contains(culprit, stderr);
        Assert.Single(stderr.TrimEnd().Split('\n'));
        Assert.DoesNotContain("   at ", stderr);
    }

    [Fact]
    public void PromptLongerThanTheContextIsRefused()
    {
        var prompt = string.Concat(Enumerable.Repeat("And the LORD spake unto Moses, saying, ", 80));
        var (code, _, stderr) = Run("generate", "--prompt", prompt, "--max-tokens", "4");
        Assert.Equal(ExitCodes.BadArguments, code);
        Assert.Contains("context", stderr);
        Assert.Single(stderr.TrimEnd().Split('\n'));
    }

    [Fact]
    public void BrokenModelFileIsNamedAndVerboseShowsTheTrace()
    {
        var dir = TestPaths.NewTempDir("broken");
        foreach (var f in new[] { "config.json", "tokenizer.model" })
            File.Copy(Path.Combine(TestPaths.Model("tiny-kjv"), f), Path.Combine(dir, f));
        File.WriteAllBytes(Path.Combine(dir, "model.safetensors"), [1, 2, 3, 4, 5]);
        var (code, _, stderr) = Run("generate", "--prompt", "x", "--model", dir);
        Assert.Equal(ExitCodes.BadModel, code);
        Assert.Contains("model.safetensors", stderr);
        Assert.Single(stderr.TrimEnd().Split('\n'));
        var verbose = Run("generate", "--prompt", "x", "--model", dir, "--verbose");
        Assert.Contains("   at ", verbose.Err);
    }
}
