using MiniLlm.Engine;
using MiniLlm.Kernels;
using MiniLlm.Loader;

namespace MiniLlm.Tests;

/// <summary>
/// The one-dispatch pass (each thread its own heads, MLP slice and column slices of o and down, partials added
/// after barriers), for decode steps and for prompts of several tokens, against the independent reference and
/// against the op-by-op path: across KV tile boundaries (the tile transpose is split between threads; prompts that
/// start inside a tile, fill whole tiles, end inside one), fp32 and bf16 weights, 2 and 3 threads, an MLP and a
/// vocabulary that do not split evenly, and a bf16 paged cache.
/// </summary>
public class TensorParallelPassTests
{
    public static TheoryData<string, int, int, string, int> Shapes => new()
    {
        // name, heads, kv heads, weight dtype, threads
        { "tp2-f32", 4, 2, "F32", 2 },
        { "tp2-bf16", 4, 2, "BF16", 2 },
        { "tp3-f32", 6, 3, "F32", 3 },
        { "tp3-bf16-gqa2", 6, 3, "BF16", 3 },
    };

    // hidden 64, head_dim 32, MLP 96 (three 32-wide slices: 32 + 64 over two threads), vocab 97 (a ragged LM head)
    private static RandomModel Make(string name, int heads, int kv, string dtype) =>
        new(new RandomModelSpec { Hidden = 64, Intermediate = 96, Heads = heads, KvHeads = kv, HeadDim = 32, Vocab = 97, Context = 64, DType = dtype, Seed = 77 },
            TestPaths.NewTempDir(name));

    // 50 positions: the decode crosses the tile boundaries at 16, 32 and 48
    private static readonly int[] Tokens = Enumerable.Range(0, 50).Select(i => (i * 37 + 11) % 97).ToArray();

    // The 50 positions fed as chunks. Prompts of 11–64 tokens whose panels are more than 5/8 full take the tensor-parallel pass (3 does not):
    //  A: 3 op by op; 29 from inside tile 0 (completes it at 15, its earlier keys rows, then all of tile 1); a decode
    //     step; 14 from inside tile 2; a decode step completing tile 2 at 47; two more.
    //  B: a whole tile from position 0; 13 rows of tile 1; three decode steps (the last completes it); a whole tile
    //     from 32; two decode steps.
    //  Decode: a prompt of 5, then one token at a time (every tile completed by a decode step).
    private static readonly int[][] Schedules = [[3, 29, 1, 14, 1, 1, 1], [16, 13, 1, 1, 1, 16, 1, 1], [5, .. Enumerable.Repeat(1, 45)]];

    /// <summary>Feeds <see cref="Tokens"/> in chunks of the given sizes; the logits after each chunk, at its last position.</summary>
    private static Dictionary<int, float[]> Feed(LlamaModel model, IKvCache cache, int[] chunks)
    {
        var all = new Dictionary<int, float[]>();
        var logits = new float[model.Config.VocabSize];
        int pos = 0;
        foreach (int n in chunks)
        {
            model.Forward(Tokens.AsSpan(pos, n), pos, cache, logits);
            pos += n;
            all[pos - 1] = (float[])logits.Clone();
        }
        Assert.Equal(Tokens.Length, pos);
        return all;
    }

    private static void AssertClose(double[] reference, ReadOnlySpan<float> actual, double relative, string what)
    {
        double maxRef = reference.Max(Math.Abs), maxErr = 0;
        for (int i = 0; i < reference.Length; i++) maxErr = Math.Max(maxErr, Math.Abs(reference[i] - actual[i]));
        Assert.True(maxErr < relative * maxRef, $"{what}: max abs error {maxErr:E3} vs bound {relative * maxRef:E3}");
    }

    /// <summary>Every key and value of the first <paramref name="length"/> positions of every layer, within <paramref name="relative"/> of <paramref name="expected"/>'s (at least 1 in scale).</summary>
    private static void AssertSameKv(IKvCache expected, IKvCache actual, LlamaConfig c, int length, double relative, string what)
    {
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            KvView x = actual.Layer(l), y = expected.Layer(l);
            for (int pos = 0; pos < length; pos++)
                for (int e = 0; e < c.KvDim; e++)
                {
                    float ka = x.KeyAt(pos, e, length), kb = y.KeyAt(pos, e, length);
                    Assert.True(Math.Abs(ka - kb) <= relative * Math.Max(1, Math.Abs(kb)), $"{what} layer {l} key [{pos}, {e}]: {ka} vs {kb}");
                    float va = x.ValueAt(pos, e), vb = y.ValueAt(pos, e);
                    Assert.True(Math.Abs(va - vb) <= relative * Math.Max(1, Math.Abs(vb)), $"{what} layer {l} value [{pos}, {e}]: {va} vs {vb}");
                }
        }
    }

    /// <summary>Each step's logits, [sequences × V], against the op-by-op path's.</summary>
    private static void AssertSameLogits(List<float[]> expected, List<float[]> actual, int sequences, int V, string what)
    {
        Assert.Equal(expected.Count, actual.Count);
        for (int s = 0; s < expected.Count; s++)
            for (int b = 0; b < sequences; b++)
                AssertClose(expected[s].AsSpan(b * V, V).ToArray().Select(v => (double)v).ToArray(), actual[s].AsSpan(b * V, V), 1e-4, $"{what} step {s}, sequence {b}");
    }

    [Theory]
    [MemberData(nameof(Shapes))]
    public void DecodeMatchesReference(string name, int heads, int kv, string dtype, int threads)
    {
        var rm = Make(name, heads, kv, dtype);
        var reference = new NaiveLlama(rm).Logits(Tokens);
        using var model = LlamaModel.Load(rm.Dir, threads);
        Assert.True(model.UsesTensorParallelDecode, $"{name}: the model should take the tensor-parallel decode");
        using var cache = model.NewKvCache();
        var logits = new float[rm.Spec.Vocab];
        model.Forward(Tokens.AsSpan(0, 5), 0, cache, logits);   // a prompt, then one token at a time
        for (int pos = 5; pos < Tokens.Length; pos++)
        {
            model.Forward(Tokens.AsSpan(pos, 1), pos, cache, logits);
            AssertClose(reference[pos], logits, 1e-4, $"{name} decode position {pos}");
        }
    }

    [Theory]
    [MemberData(nameof(Shapes))]
    public void PromptChunksMatchReference(string name, int heads, int kv, string dtype, int threads)
    {
        var rm = Make(name + "-chunks", heads, kv, dtype);
        var reference = new NaiveLlama(rm).Logits(Tokens);
        using var model = LlamaModel.Load(rm.Dir, threads);
        foreach (int n in new[] { 11, 12, 13, 14, 16, 21, 24, 29, 41, 64 })
            Assert.True(model.UsesTensorParallelPrefill(n), $"{name}: a {n}-token prompt should take the tensor-parallel pass");
        foreach (int n in new[] { 1, 3, 10, 20, 40 })
            Assert.False(model.UsesTensorParallelPrefill(n), $"{name}: a {n}-token prompt should go op by op");
        for (int s = 0; s < 2; s++)
        {
            using var cache = model.NewKvCache();
            foreach (var (pos, logits) in Feed(model, cache, Schedules[s]))
                AssertClose(reference[pos], logits, 1e-4, $"{name} schedule {s}, chunk ending at position {pos}");
        }
    }

    /// <summary>
    /// Steps of several sequences: in step s, steps[s][b] new tokens of sequence b (each its own cache, its tokens a
    /// function of sequence and position), with <see cref="LlamaModel.TensorParallelBatch"/> on or off; the logits of
    /// every step ([sequences × V]) and the caches.
    /// </summary>
    private static (ContiguousKvCache[] Caches, List<float[]> Logits) RunSteps(LlamaModel model, int[][] steps, bool tensorParallel)
    {
        int B = steps[0].Length, V = model.Config.VocabSize;
        model.TensorParallelBatch = tensorParallel;
        try
        {
            var caches = Enumerable.Range(0, B).Select(_ => model.NewKvCache()).ToArray();
            var at = new int[B];
            var all = new List<float[]>();
            var logits = new float[B * V];
            foreach (var counts in steps)
            {
                var tokens = new List<int>();
                var slices = new SequenceSlice[B];
                for (int b = 0; b < B; b++)
                {
                    slices[b] = new SequenceSlice(at[b], counts[b], caches[b]);
                    for (int i = 0; i < counts[b]; i++) tokens.Add((b * 29 + (at[b] + i) * 11 + 5) % V);
                    at[b] += counts[b];
                }
                model.Forward(tokens.ToArray(), slices, logits);
                all.Add((float[])logits.Clone());
            }
            return (caches, all);
        }
        finally { model.TensorParallelBatch = true; }
    }

    /// <summary><see cref="RunSteps"/> through the pass and op by op: every step's logits, then every cached key and value.</summary>
    private static void AssertStepsMatchTheOpByOpPath(LlamaModel model, int[][] steps, string what)
    {
        var (tpCaches, tp) = RunSteps(model, steps, true);
        var (opCaches, op) = RunSteps(model, steps, false);
        try
        {
            AssertSameLogits(op, tp, steps[0].Length, model.Config.VocabSize, what);
            for (int b = 0; b < tpCaches.Length; b++) AssertSameKv(opCaches[b], tpCaches[b], model.Config, steps.Sum(c => c[b]), 1e-4, $"{what} sequence {b}");
        }
        finally
        {
            foreach (var c in tpCaches) c.Dispose();
            foreach (var c in opCaches) c.Dispose();
        }
    }

    /// <summary>
    /// A step of several sequences through the pass (each its own cache and positions; 12 rows fill a 16-row panel
    /// enough) against the same steps op by op: prompts of 3–6 tokens in one step (54 rows), then 22 decode steps of
    /// all 12 together (tiles completing at four different steps), then a step mixing a 4-token prompt chunk with 11
    /// decode rows.
    /// </summary>
    [Theory]
    [MemberData(nameof(Shapes))]
    public void BatchStepsMatchTheOpByOpPath(string name, int heads, int kv, string dtype, int threads)
    {
        var rm = Make(name + "-batch", heads, kv, dtype);
        using var model = LlamaModel.Load(rm.Dir, threads);
        const int B = 12;
        Assert.True(model.UsesTensorParallelBatch(B, B));
        Assert.False(model.UsesTensorParallelBatch(8, 8));   // half a panel: op by op
        int[][] steps = [[3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6], .. Enumerable.Repeat(Enumerable.Repeat(1, B).ToArray(), 22), [4, .. Enumerable.Repeat(1, B - 1)]];
        AssertStepsMatchTheOpByOpPath(model, steps, name);
    }

    /// <summary>
    /// A step of several sequences longer than one pass goes through it in passes of 64 rows, a sequence cut between
    /// two passes going on in the next, then the rest by its rows; against the same steps op by op. Six prompts of
    /// 30, 70, 5, 12, 40 and 2 tokens in one step (passes [30 + 34] [36 + 5 + 12 + 11] and a rest of 29 + 2 through
    /// the pass); then a step of one token each but 60 for the third sequence (a pass of 64 and a rest of one decode
    /// step); then three decode steps of all six (op by op).
    /// </summary>
    [Theory]
    [InlineData("F32", 2)]
    [InlineData("BF16", 3)]
    public void LongBatchStepsGoThroughThePassInPasses(string dtype, int threads)
    {
        int heads = threads * 2, kv = threads;
        var rm = new RandomModel(new RandomModelSpec { Hidden = 64, Intermediate = 96, Heads = heads, KvHeads = kv, HeadDim = 32, Vocab = 97, Context = 192, DType = dtype, Seed = 79 },
            TestPaths.NewTempDir($"tp-passes-{dtype}-{threads}"));
        using var model = LlamaModel.Load(rm.Dir, threads);
        Assert.True(model.PassesTensorParallelBatch(159, 6));
        Assert.False(model.PassesTensorParallelBatch(64, 6));
        AssertStepsMatchTheOpByOpPath(model, [[30, 70, 5, 12, 40, 2], [1, 1, 60, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype);
    }

    /// <summary>
    /// A prompt longer than one pass goes through it in chunks of 64 tokens, the rest by
    /// its length: 65 (64 + a decode step), 100 (64 + 36 op by op), 150 (64 + 64 + 22 op by op), 160 (64 + 64 + 32
    /// through the pass). The last token's logits and the next decode step against the reference, from position 0
    /// and from inside a tile; profiled, the prompt is one pass.
    /// </summary>
    [Theory]
    [InlineData(0, 65)]
    [InlineData(0, 100)]
    [InlineData(0, 150)]
    [InlineData(5, 160)]
    public void LongPromptsGoThroughThePassInChunks(int start, int count)
    {
        var rm = new RandomModel(new RandomModelSpec { Hidden = 64, Intermediate = 96, Heads = 4, KvHeads = 2, HeadDim = 32, Vocab = 97, Context = 192, DType = "F32", Seed = 78 },
            TestPaths.NewTempDir($"tp-long-{start}-{count}"));
        var tokens = Enumerable.Range(0, start + count + 1).Select(i => (i * 41 + 7) % 97).ToArray();
        var reference = new NaiveLlama(rm).Logits(tokens);
        using var model = LlamaModel.Load(rm.Dir, threads: 2);
        Assert.True(model.ChunksTensorParallelPrefill(count));
        Assert.False(model.ChunksTensorParallelPrefill(64));   // one pass holds 64
        using var cache = model.NewKvCache();
        var logits = new float[rm.Spec.Vocab];
        if (start > 0) model.Forward(tokens.AsSpan(0, start), 0, cache, logits);
        var prof = new OpProfiler(model.Config.NumHiddenLayers);
        model.Profiler = prof;
        model.Forward(tokens.AsSpan(start, count), start, cache, logits);
        model.Profiler = null;
        Assert.Equal(1, prof.Passes);
        Assert.True(prof.Seconds(OpKind.LmHead) > 0);
        AssertClose(reference[start + count - 1], logits, 1e-4, $"{count} tokens from {start}");
        model.Forward(tokens.AsSpan(start + count, 1), start + count, cache, logits);   // reads every chunk's keys and values
        AssertClose(reference[start + count], logits, 1e-4, $"the decode step after {count} tokens from {start}");
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(2)]
    public void PassWritesTheSameBf16PagedCacheAsTheOpByOpPath(int schedule)
    {
        var chunks = Schedules[schedule];
        var rm = Make("tp-paged-bf16", 4, 2, "F32");
        using var model = LlamaModel.Load(rm.Dir, threads: 2);
        var c = model.Config;
        using var pool = new KvBlockPool(c.NumHiddenLayers, c.KvDim, blocks: 8, KvType.BF16);
        (PagedKvCache Cache, Dictionary<int, float[]> Logits) Run(bool tensorParallel, int firstBlock)
        {
            model.TensorParallel = tensorParallel;
            Assert.Equal(tensorParallel, model.UsesTensorParallelDecode);
            Assert.Equal(tensorParallel, model.UsesTensorParallelPrefill(13));
            var cache = new PagedKvCache(pool, 64);
            for (int b = 0; b < 4; b++) cache.Add(firstBlock + (b * 3) % 4);   // blocks out of order: the table matters
            return (cache, Feed(model, cache, chunks));
        }
        var (tp, tpLogits) = Run(true, 0);
        var (op, opLogits) = Run(false, 4);
        foreach (var (pos, logits) in opLogits)
            AssertClose(logits.Select(v => (double)v).ToArray(), tpLogits[pos], 1e-4, $"logits at {pos}");
        // bf16 keeps 8 bits: the two paths' fp32 sums may round to neighbouring bf16 values
        AssertSameKv(op, tp, c, Tokens.Length, 1e-2f, "paged bf16");
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void ContiguousBf16CacheGivesThePagedBf16CachesLogits(bool tensorParallel)
    {
        // The same keys and values rounded to bf16, held contiguously or in blocks out of order: the same bits.
        var rm = Make("contiguous-bf16", 4, 2, "F32");
        using var model = LlamaModel.Load(rm.Dir, threads: 2);
        model.TensorParallel = tensorParallel;
        var c = model.Config;
        using var pool = new KvBlockPool(c.NumHiddenLayers, c.KvDim, blocks: 8, KvType.BF16);
        using var paged = new PagedKvCache(pool, 64);
        for (int b = 0; b < 4; b++) paged.Add((b * 3) % 4);
        using var bf16 = model.NewKvCache(64, KvType.BF16);
        using var f32 = model.NewKvCache(64);
        Assert.Equal(f32.Bytes, 2 * bf16.Bytes);
        float[][] Run(IKvCache cache)
        {
            var all = new float[Tokens.Length][];
            var logits = new float[c.VocabSize];
            model.Forward(Tokens.AsSpan(0, 5), 0, cache, logits);
            all[4] = (float[])logits.Clone();
            for (int pos = 5; pos < Tokens.Length; pos++)
            {
                model.Forward(Tokens.AsSpan(pos, 1), pos, cache, logits);
                all[pos] = (float[])logits.Clone();
            }
            return all;
        }
        var fromPaged = Run(paged);
        var fromContiguous = Run(bf16);
        var fromF32 = Run(f32);
        for (int pos = 4; pos < Tokens.Length; pos++) Assert.Equal(fromPaged[pos], fromContiguous[pos]);
        Assert.Contains(Enumerable.Range(4, Tokens.Length - 4), pos => !fromF32[pos].SequenceEqual(fromContiguous[pos]));   // bf16 really rounds
    }
}
