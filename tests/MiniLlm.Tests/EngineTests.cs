using MiniLlm.Engine;

namespace MiniLlm.Tests;

/// <summary>Paged KV cache, prefix caching, scheduling and preemption: outputs must not depend on any of them.</summary>
public class EngineTests
{
    private static readonly string[] Prompts =
    [
        "And God said",
        "In the beginning God created the heaven and the earth. And the earth was without form, and void",
        "The fool",
        "Blessed are the meek: for they shall inherit the earth. Blessed are they which do hunger",
        "A penny saved is",
        "Unix is simple. It just takes a genius to understand its simplicity",
        "And Moses said unto the LORD",
        "Love is patient",
    ];

    private static LlamaModel Kjv()
    {
        var m = LlamaModel.Load(TestPaths.Model("tiny-kjv"), threads: 2, maxTokens: 128);
        m.BatchInvariant = true;   // exact comparisons need per-sequence results independent of the batch
        return m;
    }

    private static Dictionary<int, int[]> RunAll(LlamaModel m, EngineOptions o, IEnumerable<int[]> prompts, int maxTokens)
    {
        using var e = new LlmEngine(m, o);
        var ids = prompts.Select(p => e.AddRequest(p, SamplingParams.Greedy, maxTokens)).ToList();
        e.RunToCompletion();
        e.Blocks.CheckInvariants();
        return ids.ToDictionary(id => id, id => e.Get(id).Output.ToArray());
    }

    [Fact]
    public void BatchedOutputsEqualEachRequestAlone()
    {
        using var m = Kjv();
        var prompts = Prompts.Select(p => m.Tokenizer.Encode(p)).ToArray();
        // Alone: one request per engine, whole prompt in one chunk.
        var alone = prompts.Select(p => RunAll(m, new EngineOptions { MaxBatchedTokens = 128 }, [p], 40).Values.Single()).ToArray();
        // The same with the single-request Generator on a contiguous cache.
        var gen = new Generator(m);
        for (int i = 0; i < prompts.Length; i++)
            Assert.Equal(alone[i], gen.Generate(prompts[i], new GenerationOptions { MaxTokens = 40, Sampling = SamplingParams.Greedy }).OutputIds);

        foreach (int chunk in new[] { 1, 7, 64 })
        {
            var together = RunAll(m, new EngineOptions { MaxBatchedTokens = chunk, MaxSeqs = 64 }, prompts, 40);
            for (int i = 0; i < prompts.Length; i++)
                Assert.True(alone[i].SequenceEqual(together[i]), $"chunk {chunk}, prompt {i}: batched output differs from alone");
        }
    }

    [Fact]
    public void Bf16KvHoldsTwiceTheBlocksAndBatchesExactly()
    {
        using var m = Kjv();
        var prompts = Prompts.Select(p => m.Tokenizer.Encode(p)).ToArray();
        var opts = new EngineOptions { KvType = MiniLlm.Kernels.KvType.BF16, KvMemoryBytes = 8 << 20, MaxBatchedTokens = 128 };
        using (var f32 = new LlmEngine(m, opts with { KvType = MiniLlm.Kernels.KvType.F32 }))
        using (var bf16 = new LlmEngine(m, opts))
            Assert.Equal(2 * f32.Pool.Blocks, bf16.Pool.Blocks);
        var alone = prompts.Select(p => RunAll(m, opts, [p], 32).Values.Single()).ToArray();
        var together = RunAll(m, opts with { MaxBatchedTokens = 7 }, prompts, 32);
        for (int i = 0; i < prompts.Length; i++) Assert.Equal(alone[i], together[i]);
        // bf16 keys and values change the numbers only slightly: the first greedy tokens are the fp32 ones
        var fp32 = RunAll(m, opts with { KvType = MiniLlm.Kernels.KvType.F32 }, [prompts[0]], 32).Values.Single();
        Assert.Equal(fp32.Take(8), alone[0].Take(8));
    }

    [Fact]
    public void PreemptionUnderATinyPoolStillGivesTheSameOutputs()
    {
        using var m = Kjv();
        var prompts = Prompts.Select(p => m.Tokenizer.Encode(p)).ToArray();
        var alone = prompts.Select(p => RunAll(m, new EngineOptions { MaxBatchedTokens = 128 }, [p], 40).Values.Single()).ToArray();
        var c = m.Config;
        long blockBytes = KvBlockPool.BlockBytes(c.NumHiddenLayers, c.KvDim, MiniLlm.Kernels.KvType.F32);
        using var e = new LlmEngine(m, new EngineOptions { KvMemoryBytes = 6 * blockBytes, MaxBatchedTokens = 32 });  // 6 blocks: 96 positions in all
        var ids = prompts.Select(p => e.AddRequest(p, SamplingParams.Greedy, 40)).ToList();
        while (e.HasWork)
        {
            e.Step();
            e.Blocks.CheckInvariants();
        }
        Assert.True(e.Scheduler.Preemptions > 0, "the pool was meant to be too small to hold everyone");
        for (int i = 0; i < prompts.Length; i++) Assert.Equal(alone[i], e.Get(ids[i]).Output);
        Assert.Equal(0, e.Blocks.UsedCount);
    }

    [Fact]
    public void PrefixCacheHitsSkipPrefillAndChangeNothing()
    {
        using var m = Kjv();
        var shared = "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep.";
        var prompts = new[] { shared + " And God said", shared + " And the Spirit", shared + " Let there be" }.Select(p => m.Tokenizer.Encode(p)).ToArray();
        Assert.True(prompts[0].Length > 2 * KvBlockPool.BlockSize);
        var alone = prompts.Select(p => RunAll(m, new EngineOptions { PrefixCaching = false, MaxBatchedTokens = 128 }, [p], 24).Values.Single()).ToArray();

        using var e = new LlmEngine(m, new EngineOptions { MaxBatchedTokens = 128 });
        int first = e.AddRequest(prompts[0], SamplingParams.Greedy, 24);
        e.RunToCompletion();   // its full prompt blocks are now registered
        var later = prompts.Skip(1).Select(p => e.AddRequest(p, SamplingParams.Greedy, 24)).ToList();
        e.RunToCompletion();
        Assert.Equal(alone[0], e.Get(first).Output);
        for (int i = 0; i < later.Count; i++)
        {
            var s = e.Get(later[i]);
            Assert.True(s.CachedTokens >= 2 * KvBlockPool.BlockSize, $"request {i + 1} reused only {s.CachedTokens} tokens");
            Assert.Equal(alone[i + 1], s.Output);
        }
        Assert.True(e.Blocks.PrefixHits >= 4);
        e.Blocks.CheckInvariants();
    }

    [Fact]
    public void BlockBooksBalanceUnderThousandsOfRandomOperations()
    {
        var rm = new RandomModel(new RandomModelSpec { Hidden = 16, Intermediate = 24, Heads = 2, KvHeads = 1, HeadDim = 8, Vocab = 50, Layers = 1, Context = 96 }, TestPaths.NewTempDir("blocks"));
        using var m = LlamaModel.Load(rm.Dir, threads: 1, maxTokens: 64);
        var c = m.Config;
        long blockBytes = KvBlockPool.BlockBytes(c.NumHiddenLayers, c.KvDim, MiniLlm.Kernels.KvType.F32);
        using var e = new LlmEngine(m, new EngineOptions { KvMemoryBytes = 12 * blockBytes, MaxBatchedTokens = 24, MaxSeqs = 6 });
        var rng = new Random(7);
        var live = new List<int>();
        int added = 0, cancelled = 0;
        for (int op = 0; op < 4000; op++)
        {
            int what = rng.Next(10);
            if (what < 3)
            {
                // Shared prefixes half the time, so prefix caching and reference counts get exercised.
                int len = rng.Next(1, 60);
                var prompt = Enumerable.Range(0, len).Select(i => rng.Next(2) == 0 && i < 40 ? 3 + i % 40 : rng.Next(3, 50)).ToArray();
                live.Add(e.AddRequest(prompt, new SamplingParams { Temperature = 1, TopK = 0, TopP = 1, MinP = 0, Seed = (ulong)op }, rng.Next(1, 30), stopAtEos: false));
                added++;
            }
            else if (what < 4 && live.Count > 0)
            {
                int id = live[rng.Next(live.Count)];
                if (e.Cancel(id)) cancelled++;
                live.Remove(id);
            }
            else e.Step();
            e.Blocks.CheckInvariants();
            live.RemoveAll(id => e.Get(id).Status == SequenceStatus.Finished);
        }
        e.RunToCompletion();
        e.Blocks.CheckInvariants();
        Assert.Equal(0, e.Blocks.UsedCount);
        Assert.Equal(e.Blocks.Total, e.Blocks.FreeCount);
        for (int b = 0; b < e.Blocks.Total; b++) Assert.Equal(0, e.Blocks.RefCount(b));
        Assert.True(added > 500 && cancelled > 50, $"added {added}, cancelled {cancelled}");
        Assert.True(e.Scheduler.Preemptions > 0 && e.Blocks.PrefixHits > 0);
    }

    [Fact]
    public void TwoHundredRequestsAllFinishUnderASmallPool()
    {
        var rm = new RandomModel(new RandomModelSpec { Hidden = 32, Intermediate = 48, Heads = 4, KvHeads = 2, HeadDim = 8, Vocab = 97, Layers = 2, Context = 128 }, TestPaths.NewTempDir("two-hundred"));
        using var m = LlamaModel.Load(rm.Dir, threads: 2, maxTokens: 64);
        var c = m.Config;
        long blockBytes = KvBlockPool.BlockBytes(c.NumHiddenLayers, c.KvDim, MiniLlm.Kernels.KvType.F32);
        using var e = new LlmEngine(m, new EngineOptions { KvMemoryBytes = 20 * blockBytes, MaxBatchedTokens = 64, MaxSeqs = 16 });
        var rng = new Random(3);
        var ids = Enumerable.Range(0, 200).Select(i =>
            e.AddRequest(Enumerable.Range(0, rng.Next(1, 80)).Select(_ => rng.Next(3, 97)).ToArray(), SamplingParams.Greedy, rng.Next(1, 40), stopAtEos: false)).ToList();
        e.RunToCompletion();
        Assert.Equal(200, e.Finished.Count);
        foreach (var id in ids)
        {
            var s = e.Get(id);
            Assert.Equal(SequenceStatus.Finished, s.Status);
            Assert.True(s.Finish is FinishReason.MaxTokens or FinishReason.ContextFull);
            Assert.True(s.Output.Count > 0);
        }
        Assert.Equal(0, e.Blocks.UsedCount);
    }

    [Fact]
    public void RequestsThatCanNeverFitAreRejectedClearly()
    {
        using var m = Kjv();
        var c = m.Config;
        long blockBytes = KvBlockPool.BlockBytes(c.NumHiddenLayers, c.KvDim, MiniLlm.Kernels.KvType.F32);
        using var e = new LlmEngine(m, new EngineOptions { KvMemoryBytes = 2 * blockBytes, MaxBatchedTokens = 128 });
        var ex = Assert.Throws<RequestRejectedException>(() => e.AddRequest(m.Tokenizer.Encode(Prompts[1]), SamplingParams.Greedy, 40));
        Assert.Contains("KV blocks", ex.Message);
        Assert.Throws<RequestRejectedException>(() => e.AddRequest(new int[600], SamplingParams.Greedy, 4));
        Assert.Throws<ArgumentException>(() => e.AddRequest([1, 2], SamplingParams.Greedy, 0));
    }
}
