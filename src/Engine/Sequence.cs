using System.Diagnostics;

namespace MiniLlm.Engine;

public enum SequenceStatus { Waiting, Running, Finished }

/// <summary>Why a request ended, beyond the generation reasons: it can also be cancelled.</summary>
public enum FinishReason { Eos, MaxTokens, ContextFull, Cancelled }

/// <summary>
/// One request: its prompt, what it has generated, how many of its tokens have keys and values in the cache
/// (<see cref="Computed"/>), its blocks, its sampler and its timestamps. A preempted sequence keeps its tokens and
/// starts computing them again from zero.
/// </summary>
public sealed class Sequence
{
    private readonly List<int> _output;

    public int Id { get; }
    public int[] Prompt { get; }
    public IReadOnlyList<int> Output => _output;
    public int MaxTokens { get; }
    public bool StopAtEos { get; }
    public SamplingParams Sampling { get; }
    public Sampler Sampler { get; }
    public PagedKvCache Cache { get; }
    public SequenceStatus Status { get; internal set; } = SequenceStatus.Waiting;
    public FinishReason? Finish { get; internal set; }

    /// <summary>Tokens whose keys and values are in the cache.</summary>
    public int Computed { get; internal set; }
    /// <summary>Leading tokens whose blocks came from the prefix cache the last time it was admitted.</summary>
    public int CachedTokens { get; internal set; }
    /// <summary>Full blocks whose hashes are registered, and the hash of the last of them.</summary>
    internal int HashedBlocks;
    internal ulong LastHash;

    public int Length => Prompt.Length + _output.Count;
    public int Token(int i) => i < Prompt.Length ? Prompt[i] : _output[i - Prompt.Length];

    // Timestamps (Stopwatch ticks of the engine clock).
    public long ArrivalTicks { get; internal set; }
    public long FirstScheduledTicks { get; internal set; }
    public long FirstTokenTicks { get; internal set; }
    public long FinishedTicks { get; internal set; }
    public int Preemptions { get; internal set; }

    internal Sequence(int id, int[] prompt, SamplingParams sampling, int maxTokens, bool stopAtEos, int vocab, PagedKvCache cache, SamplerScratch scratch)
    {
        Id = id; Prompt = prompt; Sampling = sampling; MaxTokens = maxTokens; StopAtEos = stopAtEos; Cache = cache;
        Sampler = new Sampler(sampling, vocab, scratch);
        _output = new List<int>(maxTokens);
    }

    internal void Append(int token) => _output.Add(token);

    public double QueueMs => Ms(FirstScheduledTicks - ArrivalTicks);
    public double TtftMs => Ms(FirstTokenTicks - ArrivalTicks);
    /// <summary>Time per output token after the first.</summary>
    public double TpotMs => _output.Count > 1 ? Ms(FinishedTicks - FirstTokenTicks) / (_output.Count - 1) : 0;
    public double E2eMs => Ms(FinishedTicks - ArrivalTicks);

    private static double Ms(long ticks) => ticks * 1000.0 / Stopwatch.Frequency;
}
