using MiniLlm.Engine;

namespace MiniLlm.Tests;

/// <summary>One token's q/k/v and gate/up as one GEMV over matrices that lie end to end: the same bits as separate ones.</summary>
public class FusedProjectionTests
{
    [Theory]
    [InlineData("F32")]
    [InlineData("BF16")]
    public void FusedDecodeGivesTheSameBits(string dtype)
    {
        // every matrix a whole number of 4 KiB pages, so the arena lays q, k, v (and gate, up) end to end
        var rm = new RandomModel(new RandomModelSpec { Hidden = 256, Intermediate = 512, Heads = 4, KvHeads = 2, HeadDim = 64, Vocab = 97, Layers = 2, Context = 64, DType = dtype },
            TestPaths.NewTempDir("fused-" + dtype));
        using var model = LlamaModel.Load(rm.Dir, threads: 2);
        model.TensorParallel = false;   // the op-by-op decode, where the fused matrices are read
        for (int l = 0; l < 2; l++) Assert.Equal((true, true), model.FusedProjections(l));

        int[] prompt = [3, 14, 15, 92, 65];
        float[][] Run(bool fused)
        {
            model.FusedDecodeProjections = fused;
            using var cache = model.NewKvCache(16);
            var logits = new float[model.Config.VocabSize];
            var steps = new List<float[]>();
            model.Forward(prompt, 0, cache, logits);
            for (int i = 0; i < 6; i++)
            {
                int next = Array.IndexOf(logits, logits.Max());
                model.Forward([next], prompt.Length + i, cache, logits);
                steps.Add((float[])logits.Clone());
            }
            return steps.ToArray();
        }
        var apart = Run(false);
        var fused = Run(true);
        for (int s = 0; s < apart.Length; s++)
            Assert.True(apart[s].AsSpan().SequenceEqual(fused[s]), $"{dtype}: decode step {s} differs with the fused projections");
        Assert.Contains(apart[^1], x => x != 0);
    }

    [Fact]
    public void MatricesNotEndToEndStayApart()
    {
        // 36 × 36 fp32 is 5184 bytes: each matrix starts on the next 4 KiB boundary, so nothing is fused
        var rm = new RandomModel(new RandomModelSpec { Hidden = 36, Intermediate = 67, Heads = 6, KvHeads = 3, HeadDim = 6 }, TestPaths.NewTempDir("unfused"));
        using var model = LlamaModel.Load(rm.Dir, threads: 2);
        Assert.Equal((false, false), model.FusedProjections(0));
    }
}
