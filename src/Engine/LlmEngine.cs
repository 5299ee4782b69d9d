using System.Diagnostics;

namespace MiniLlm.Engine;

/// <summary>How the engine is sized.</summary>
public sealed record EngineOptions
{
    /// <summary>Bytes of KV memory; 0 = room for <see cref="MaxSeqs"/> sequences of full context (capped at 4 GiB).</summary>
    public long KvMemoryBytes { get; init; }
    public int MaxBatchedTokens { get; init; } = 512;
    public int MaxSeqs { get; init; } = 64;
    public bool PrefixCaching { get; init; } = true;
    /// <summary>KV element type: fp32, or bf16 (twice the sequences in the same memory).</summary>
    public Kernels.KvType KvType { get; init; } = Kernels.KvType.F32;
}

/// <summary>A request the engine can never serve (too long for the context or for the whole KV pool).</summary>
public sealed class RequestRejectedException(string message) : Exception(message);

/// <summary>What one step produced for one request.</summary>
public readonly record struct StepOutput(int RequestId, int Token, bool Finished, FinishReason? Reason);

/// <summary>
/// Continuous batching over one model: add requests at any time; each <see cref="Step"/> schedules, runs one
/// forward pass over every scheduled sequence, samples, and retires finished sequences.
/// </summary>
public sealed class LlmEngine : IDisposable
{
    private readonly LlamaModel _model;
    private readonly KvBlockPool _pool;
    private readonly BlockManager _blocks;
    private readonly Scheduler _scheduler;
    private readonly ModelRunner _runner;
    private readonly SamplerScratch _scratch;
    private readonly Dictionary<int, Sequence> _live = new();
    private readonly List<Sequence> _finished = new();
    private readonly List<StepOutput> _outputs = new();
    private readonly HashSet<int> _eos;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private int[] _sampled = new int[64];
    private int _nextId;

    public LlamaModel Model => _model;
    public BlockManager Blocks => _blocks;
    public Scheduler Scheduler => _scheduler;
    public KvBlockPool Pool => _pool;
    public bool HasWork => _scheduler.HasWork;
    public IReadOnlyList<Sequence> Finished => _finished;
    public long Steps { get; private set; }

    public LlmEngine(LlamaModel model, EngineOptions? options = null)
    {
        var o = options ?? new EngineOptions();
        _model = model;
        var c = model.Config;
        if (o.MaxBatchedTokens > model.MaxTokens)
            throw new ArgumentException($"max-batched-tokens {o.MaxBatchedTokens} exceeds the model's batch buffers ({model.MaxTokens}); load the model with a larger maxTokens", "max-batched-tokens");
        long bytes = o.KvMemoryBytes > 0 ? o.KvMemoryBytes
            : Math.Min(4L << 30, (long)o.MaxSeqs * model.Context * KvBlockPool.BlockBytes(c.NumHiddenLayers, c.KvDim, o.KvType) / KvBlockPool.BlockSize);
        int blocks = KvBlockPool.BlocksFor(bytes, c.NumHiddenLayers, c.KvDim, o.KvType);
        if (blocks < 1) throw new ArgumentException($"kv-memory {bytes} bytes holds not even one block of {KvBlockPool.BlockSize} positions", "kv-memory");
        _pool = new KvBlockPool(c.NumHiddenLayers, c.KvDim, blocks, o.KvType);
        _blocks = new BlockManager(blocks, KvBlockPool.BlockSize, o.PrefixCaching);
        _scheduler = new Scheduler(_blocks, o.MaxBatchedTokens, o.MaxSeqs);
        _runner = new ModelRunner(model);
        _scratch = new SamplerScratch(c.VocabSize);
        _eos = new HashSet<int>(c.EosTokenIds);
        if (model.Files.Tokenizer is { } tok) _eos.Add(tok.EosId);
    }

    /// <summary>Queues a request; returns its id. Throws <see cref="RequestRejectedException"/> if it can never fit.</summary>
    public int AddRequest(int[] promptIds, SamplingParams sampling, int maxTokens, bool stopAtEos = true)
    {
        sampling.Validate();
        if (maxTokens <= 0) throw new ArgumentException($"max-tokens must be > 0, got {maxTokens}", "max-tokens");
        if (promptIds.Length == 0) throw new ArgumentException("the prompt encodes to no tokens", "prompt");
        int ctx = _model.Context;
        if (promptIds.Length >= ctx)
            throw new RequestRejectedException($"prompt is {promptIds.Length} tokens but the model's context is {ctx}");
        foreach (int t in promptIds)
            if ((uint)t >= (uint)_model.Config.VocabSize) throw new ArgumentException($"token id {t} is outside the vocabulary", "prompt");
        int maxLen = Math.Min(ctx, promptIds.Length + maxTokens);
        int needBlocks = (maxLen + KvBlockPool.BlockSize - 1) / KvBlockPool.BlockSize;
        if (needBlocks > _blocks.Total)
            throw new RequestRejectedException($"request needs {needBlocks} KV blocks ({maxLen} positions) but the pool has {_blocks.Total}; raise --kv-memory");
        int id = _nextId++;
        var s = new Sequence(id, promptIds, sampling, maxTokens, stopAtEos, _model.Config.VocabSize, new PagedKvCache(_pool, maxLen), _scratch)
        {
            ArrivalTicks = _clock.ElapsedTicks,
        };
        _live[id] = s;
        _scheduler.Add(s);
        return id;
    }

    public int AddRequest(string prompt, SamplingParams sampling, int maxTokens, bool stopAtEos = true) =>
        AddRequest(_model.Tokenizer.Encode(prompt), sampling, maxTokens, stopAtEos);

    public Sequence Get(int id) => _live.TryGetValue(id, out var s) ? s : _finished.First(f => f.Id == id);

    /// <summary>Stops a request now; its blocks go back to the pool. False if it already finished.</summary>
    public bool Cancel(int id)
    {
        if (!_live.TryGetValue(id, out var s)) return false;
        FinishSequence(s, FinishReason.Cancelled);
        return true;
    }

    /// <summary>schedule → run → postprocess. Returns the tokens produced (valid until the next call).</summary>
    public IReadOnlyList<StepOutput> Step()
    {
        _outputs.Clear();
        var chunks = _scheduler.Schedule(_clock.ElapsedTicks);
        if (chunks.Count == 0) return _outputs;
        if (_sampled.Length < chunks.Count) _sampled = new int[chunks.Count * 2];
        _runner.Run(chunks, _sampled);
        Steps++;
        long now = _clock.ElapsedTicks;
        for (int i = 0; i < chunks.Count; i++)
        {
            var s = chunks[i].Sequence;
            RegisterFullBlocks(s);
            int token = _sampled[i];
            if (token < 0) continue;
            s.Append(token);
            if (s.FirstTokenTicks == 0) s.FirstTokenTicks = now;
            FinishReason? reason =
                s.StopAtEos && _eos.Contains(token) ? FinishReason.Eos :
                s.Output.Count >= s.MaxTokens ? FinishReason.MaxTokens :
                s.Length >= s.Cache.MaxBlocks * KvBlockPool.BlockSize || s.Length >= _model.Context ? FinishReason.ContextFull : null;
            if (reason is { } r) FinishSequence(s, r);
            _outputs.Add(new StepOutput(s.Id, token, reason != null, reason));
        }
        return _outputs;
    }

    /// <summary>Registers every block that became full, chaining hashes over the whole sequence so far.</summary>
    private void RegisterFullBlocks(Sequence s)
    {
        int bs = KvBlockPool.BlockSize;
        Span<int> tokens = stackalloc int[bs];
        while (s.HashedBlocks < s.Computed / bs)
        {
            int b = s.HashedBlocks;
            for (int i = 0; i < bs; i++) tokens[i] = s.Token(b * bs + i);
            ulong h = BlockManager.ChainHash(s.LastHash, tokens);
            _blocks.Register(s.Cache[b], h, tokens);
            s.LastHash = h;
            s.HashedBlocks++;
        }
    }

    private void FinishSequence(Sequence s, FinishReason reason)
    {
        s.Finish = reason;
        s.Status = SequenceStatus.Finished;
        s.FinishedTicks = _clock.ElapsedTicks;
        if (s.FirstTokenTicks == 0) s.FirstTokenTicks = s.FinishedTicks;
        _scheduler.Retire(s);
        _live.Remove(s.Id);
        _finished.Add(s);
    }

    /// <summary>Runs steps until every request has finished.</summary>
    public void RunToCompletion(Action<IReadOnlyList<StepOutput>>? onStep = null)
    {
        while (HasWork)
        {
            long before = Steps;
            var o = Step();
            if (Steps == before && HasWork)
                throw new InvalidOperationException("the scheduler could not run any sequence although requests are pending");
            onStep?.Invoke(o);
        }
    }

    public void Dispose() => _pool.Dispose();
}
