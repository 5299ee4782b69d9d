using MiniLlm.Engine;

namespace MiniLlm.Tests;

public class SamplerTests
{
    private static readonly float[] Logits = [MathF.Log(0.5f), MathF.Log(0.3f), MathF.Log(0.2f)];

    private static double[] Frequencies(SamplingParams p, int draws = 40_000)
    {
        var s = new Sampler(p, Logits.Length);
        var counts = new double[Logits.Length];
        for (int i = 0; i < draws; i++) counts[s.Sample(Logits)]++;
        return counts.Select(c => c / draws).ToArray();
    }

    private static SamplingParams Plain => new() { Temperature = 1, TopK = 0, TopP = 1, MinP = 0, Seed = 7 };

    [Fact]
    public void GreedyIsArgmax()
    {
        var s = new Sampler(SamplingParams.Greedy, 5);
        Assert.Equal(3, s.Sample([0.1f, -2f, 0.5f, 3f, 2.9f]));
    }

    [Fact]
    public void TemperatureOneFollowsTheSoftmax()
    {
        var f = Frequencies(Plain);
        Assert.Equal(0.5, f[0], 0.015);
        Assert.Equal(0.3, f[1], 0.015);
        Assert.Equal(0.2, f[2], 0.015);
    }

    [Fact]
    public void TopKDropsTheTailAndRenormalises()
    {
        var f = Frequencies(Plain with { TopK = 2 });
        Assert.Equal(0, f[2]);
        Assert.Equal(0.625, f[0], 0.015);
    }

    [Fact]
    public void TopPKeepsTheSmallestSetReachingP()
    {
        var f = Frequencies(Plain with { TopP = 0.7f });   // 0.5 < 0.7 ≤ 0.8: keeps two
        Assert.Equal(0, f[2]);
        Assert.True(f[1] > 0.3);
        Assert.Equal(new[] { 1.0, 0, 0 }, Frequencies(Plain with { TopP = 0.4f }));
    }

    [Fact]
    public void MinPDropsTokensBelowAFractionOfTheTop()
    {
        var f = Frequencies(Plain with { MinP = 0.5f });   // keeps p ≥ 0.25
        Assert.Equal(0, f[2]);
        Assert.True(f[1] > 0.3);
    }

    [Fact]
    public void LowTemperatureSharpens()
    {
        var f = Frequencies(Plain with { Temperature = 0.2f });
        Assert.True(f[0] > 0.9);
    }

    [Fact]
    public void SameSeedSameSequence()
    {
        var a = new Sampler(Plain with { Seed = 99 }, 3);
        var b = new Sampler(Plain with { Seed = 99 }, 3);
        var c = new Sampler(Plain with { Seed = 100 }, 3);
        var sa = Enumerable.Range(0, 200).Select(_ => a.Sample(Logits)).ToArray();
        Assert.Equal(sa, Enumerable.Range(0, 200).Select(_ => b.Sample(Logits)).ToArray());
        Assert.NotEqual(sa, Enumerable.Range(0, 200).Select(_ => c.Sample(Logits)).ToArray());
    }

    [Theory]
    [InlineData(-0.1f, 0, 1f, 0f, "temperature")]
    [InlineData(1f, -1, 1f, 0f, "top-k")]
    [InlineData(1f, 0, 0f, 0f, "top-p")]
    [InlineData(1f, 0, 1.5f, 0f, "top-p")]
    [InlineData(1f, 0, 1f, 2f, "min-p")]
    public void InvalidParametersAreNamed(float t, int k, float p, float minP, string culprit)
    {
        var e = Assert.Throws<ArgumentException>(() => new Sampler(new SamplingParams { Temperature = t, TopK = k, TopP = p, MinP = minP }, 3));
        Assert.Contains(culprit, e.Message);
    }
}
