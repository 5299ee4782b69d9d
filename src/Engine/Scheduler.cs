namespace MiniLlm.Engine;

/// <summary>One sequence's share of a step: run <see cref="Tokens"/> of its tokens from <see cref="Sequence.Computed"/>.</summary>
public readonly record struct ScheduledChunk(Sequence Sequence, int Tokens);

/// <summary>
/// Decides each step, vLLM V1 style: a budget of tokens per step and a cap on running sequences. Running
/// sequences go first (one decode token each, or the next chunk of a prompt still being prefilled), then waiting
/// ones are admitted with chunked prefill, so a long prompt never stalls the others. When blocks run out the
/// newest running sequence is preempted: its blocks are freed and it is recomputed later.
/// </summary>
public sealed class Scheduler
{
    private readonly BlockManager _blocks;
    private readonly LinkedList<Sequence> _waiting = new();
    private readonly List<Sequence> _running = new();
    private readonly List<ScheduledChunk> _step = new();

    public int MaxBatchedTokens { get; }
    public int MaxSeqs { get; }
    public long Preemptions { get; private set; }
    public int WaitingCount => _waiting.Count;
    public int RunningCount => _running.Count;
    public bool HasWork => _waiting.Count > 0 || _running.Count > 0;

    public Scheduler(BlockManager blocks, int maxBatchedTokens, int maxSeqs)
    {
        if (maxBatchedTokens < 1) throw new ArgumentOutOfRangeException(nameof(maxBatchedTokens), "max-batched-tokens must be ≥ 1");
        if (maxSeqs < 1) throw new ArgumentOutOfRangeException(nameof(maxSeqs), "max-seqs must be ≥ 1");
        _blocks = blocks; MaxBatchedTokens = maxBatchedTokens; MaxSeqs = maxSeqs;
    }

    public void Add(Sequence s) => _waiting.AddLast(s);

    /// <summary>The chunks to run this step (empty when nothing can run).</summary>
    public IReadOnlyList<ScheduledChunk> Schedule(long now)
    {
        _step.Clear();
        int budget = MaxBatchedTokens;
        bool preempted = false;

        for (int i = 0; i < _running.Count && budget > 0; i++)
        {
            var s = _running[i];
            int n = Math.Min(s.Length - s.Computed, budget);
            while (!EnsureBlocks(s, s.Computed + n))
            {
                preempted = true;
                var victim = NewestUnscheduled(s);
                Preempt(victim);
                if (victim == s) { i--; n = 0; break; }
            }
            if (n == 0) continue;
            _step.Add(new ScheduledChunk(s, n));
            budget -= n;
        }

        // Admit waiting sequences in arrival order, unless this step already had to take blocks back.
        while (!preempted && budget > 0 && _waiting.First is { } node && _running.Count < MaxSeqs)
        {
            var s = node.Value;
            if (s.Cache.BlockCount == 0) AttachCachedPrefix(s);
            int n = Math.Min(s.Length - s.Computed, budget);
            if (!EnsureBlocks(s, s.Computed + n))
            {
                ReleaseBlocks(s);   // give back any prefix blocks; it waits for room
                break;
            }
            _waiting.RemoveFirst();
            s.Status = SequenceStatus.Running;
            if (s.FirstScheduledTicks == 0) s.FirstScheduledTicks = now;
            _running.Add(s);
            _step.Add(new ScheduledChunk(s, n));
            budget -= n;
        }
        return _step;
    }

    /// <summary>The newest running sequence not yet given work this step, or <paramref name="self"/> if there is none.</summary>
    private Sequence NewestUnscheduled(Sequence self)
    {
        for (int i = _running.Count - 1; i >= 0; i--)
        {
            var s = _running[i];
            if (s == self) break;
            bool scheduled = false;
            foreach (var c in _step) if (c.Sequence == s) { scheduled = true; break; }
            if (!scheduled) return s;
        }
        return self;
    }

    private void Preempt(Sequence s)
    {
        ReleaseBlocks(s);
        _running.Remove(s);
        s.Status = SequenceStatus.Waiting;
        s.Preemptions++;
        Preemptions++;
        _waiting.AddFirst(s);
    }

    /// <summary>Reuses cached blocks for the sequence's leading full blocks (never all of it: the last token is always computed).</summary>
    private void AttachCachedPrefix(Sequence s)
    {
        s.Computed = 0;
        s.CachedTokens = 0;
        s.HashedBlocks = 0;
        s.LastHash = 0;
        int bs = _blocks.BlockSize;
        int full = (s.Length - 1) / bs;
        Span<int> tokens = stackalloc int[bs];
        for (int b = 0; b < full; b++)
        {
            for (int i = 0; i < bs; i++) tokens[i] = s.Token(b * bs + i);
            ulong h = BlockManager.ChainHash(s.LastHash, tokens);
            if (_blocks.TryReuse(h, tokens) is not { } id) break;
            s.Cache.Add(id);
            s.LastHash = h;
            s.HashedBlocks++;
            s.Computed += bs;
        }
        s.CachedTokens = s.Computed;
    }

    /// <summary>Blocks for positions 0..positions−1; false (and nothing taken) if the pool cannot supply them.</summary>
    private bool EnsureBlocks(Sequence s, int positions)
    {
        int need = (positions + _blocks.BlockSize - 1) / _blocks.BlockSize - s.Cache.BlockCount;
        if (need <= 0) return true;
        if (need > _blocks.FreeCount) return false;
        for (int i = 0; i < need; i++) s.Cache.Add(_blocks.Allocate()!.Value);
        return true;
    }

    private void ReleaseBlocks(Sequence s)
    {
        for (int i = 0; i < s.Cache.BlockCount; i++) _blocks.Release(s.Cache[i]);
        s.Cache.Clear();
        s.Computed = 0;
        s.HashedBlocks = 0;
        s.LastHash = 0;
    }

    /// <summary>Removes a finished or cancelled sequence and frees its blocks.</summary>
    public void Retire(Sequence s)
    {
        if (!_running.Remove(s)) _waiting.Remove(s);
        ReleaseBlocks(s);
    }
}
