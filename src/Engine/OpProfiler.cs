using MiniLlm.Kernels;
using System.Diagnostics;

namespace MiniLlm.Engine;

/// <summary>
/// Accumulates wall time per (layer, op) of forward passes. Attach one to a <see cref="LlamaModel"/> to profile;
/// with none attached the forward pass pays one null check per op. Layer −1 (embedding, final norm, LM head) is
/// stored at index <c>layers</c>.
/// </summary>
public sealed class OpProfiler
{
    private static readonly int Ops = Enum.GetValues<OpKind>().Length;
    private readonly long[] _ticks;
    private readonly int _layers;
    private readonly List<long> _passTicks = new();   // each finished pass's wall time
    private long _thisPass;                           // ticks recorded since the last EndPass
    private long[] _waitTicks = [];                   // per thread at WaitStride: ticks spent waiting at barriers
    private const int WaitStride = 16;                // 128 bytes between two threads' counters (no false sharing)
    private readonly long[] _ownWaitTicks;            // per layer: the recording thread's barrier waits, kept off the op rows
    private long _pendingWait;                        // the recording thread's waits since its last Record
    private readonly List<long[]> _passOps = new();   // each finished pass: ticks per op kind (all layers), its own waits last
    private readonly long[] _opsAtPassStart;          // the same sums over every pass before it

    public OpProfiler(int layers)
    {
        _layers = layers;
        _ticks = new long[(layers + 1) * Ops];
        _ownWaitTicks = new long[layers + 1];
        _opsAtPassStart = new long[Ops + 1];
    }

    public int Layers => _layers;

    /// <summary>Forward passes recorded since the last <see cref="Reset"/>.</summary>
    public int Passes { get; private set; }

    /// <summary>
    /// The time since <paramref name="since"/> goes to (op, layer), less the recording thread's barrier waits inside
    /// it (<see cref="RecordWait"/> from thread 0), which go to the layer's wait (<see cref="OwnWaitSeconds(int)"/>).
    /// </summary>
    internal void Record(OpKind op, int layer, ref long since)
    {
        long now = Stopwatch.GetTimestamp(), span = now - since, wait = Math.Min(_pendingWait, span);
        _ticks[Index(op, layer)] += span - wait;
        _ownWaitTicks[layer < 0 ? _layers : layer] += wait;
        _pendingWait = 0;
        _thisPass += span;
        since = now;
    }

    /// <summary>Room for <paramref name="threads"/> threads' barrier waits (called before a pass, on one thread).</summary>
    internal void EnsureThreads(int threads)
    {
        if (_waitTicks.Length < threads * WaitStride) Array.Resize(ref _waitTicks, threads * WaitStride);
    }

    /// <summary>
    /// Thread <paramref name="thread"/> waited <paramref name="ticks"/> at a barrier (each thread writes its own slot).
    /// Thread 0 is the one that records the ops: its wait is taken out of the op it falls in at the next
    /// <see cref="Record"/>, so an op's row is the op's own time.
    /// </summary>
    internal void RecordWait(int thread, long ticks)
    {
        _waitTicks[thread * WaitStride] += ticks;
        if (thread == 0) _pendingWait += ticks;
    }

    /// <summary>
    /// Seconds each thread spent waiting at the barriers of a one-dispatch pass (<see cref="TensorParallelPass"/>),
    /// over all recorded passes; empty when no pass had barriers. Thread 0's are also <see cref="OwnWaitSeconds()"/>
    /// (a row of their own), the others' run beside thread 0's timeline.
    /// </summary>
    public IReadOnlyList<double> WaitSeconds()
    {
        var s = new double[_waitTicks.Length / WaitStride];
        for (int t = 0; t < s.Length; t++) s[t] = (double)_waitTicks[t * WaitStride] / Stopwatch.Frequency;
        return s;
    }

    internal void EndPass()
    {
        Passes++;
        _passTicks.Add(_thisPass);
        _thisPass = 0;
        var pass = new long[Ops + 1];
        for (int op = 0; op <= Ops; op++)
        {
            long sum = op == Ops ? _ownWaitTicks.Sum() : OpTicks(op);
            pass[op] = sum - _opsAtPassStart[op];
            _opsAtPassStart[op] = sum;
        }
        _passOps.Add(pass);
    }

    private long OpTicks(int op)
    {
        long s = 0;
        for (int l = 0; l <= _layers; l++) s += _ticks[l * Ops + op];
        return s;
    }

    /// <summary>
    /// The median over the recorded passes of one op kind's time in a pass (all layers): what the op takes in the
    /// pass this code takes, where the totals (<see cref="Seconds(OpKind)"/>) mix in a neighbour's busy moments.
    /// </summary>
    public double MedianPassOpSeconds(OpKind op) => MedianOfPasses((int)op);

    /// <summary>The median over the recorded passes of the recording thread's barrier waits in a pass.</summary>
    public double MedianPassOwnWaitSeconds() => MedianOfPasses(Ops);

    private double MedianOfPasses(int slot) =>
        _passOps.Count == 0 ? 0 : Ceilings.Median(_passOps.Select(p => (double)p[slot] / Stopwatch.Frequency).ToList());

    /// <summary>
    /// Median wall time of one recorded pass, seconds. On a shared host a few passes land in a busy moment of a
    /// neighbour (L3 evicted, DRAM contended); the median is the pass this code takes, the mean mixes in the host.
    /// </summary>
    public double MedianPassSeconds
    {
        get
        {
            if (_passTicks.Count == 0) return 0;
            return Ceilings.Median(_passTicks.Select(t => (double)t / Stopwatch.Frequency).ToList());
        }
    }

    private int Index(OpKind op, int layer) => (layer < 0 ? _layers : layer) * Ops + (int)op;

    public double Seconds(OpKind op, int layer) => (double)_ticks[Index(op, layer)] / Stopwatch.Frequency;

    /// <summary>Recorded wall time: every op row and the recording thread's barrier waits.</summary>
    public double TotalSeconds => (double)(_ticks.Sum() + _ownWaitTicks.Sum()) / Stopwatch.Frequency;

    /// <summary>Seconds the recording thread (thread 0) waited at barriers inside layer <paramref name="layer"/>'s ops (−1: outside the layers).</summary>
    public double OwnWaitSeconds(int layer) => (double)_ownWaitTicks[layer < 0 ? _layers : layer] / Stopwatch.Frequency;

    /// <summary>Seconds the recording thread waited at barriers, all layers: the op rows' time does not include them.</summary>
    public double OwnWaitSeconds() => (double)_ownWaitTicks.Sum() / Stopwatch.Frequency;

    /// <summary>Seconds per op kind summed over layers.</summary>
    public double Seconds(OpKind op)
    {
        double s = 0;
        for (int l = -1; l < _layers; l++) s += Seconds(op, l);
        return s;
    }

    public void Reset()
    {
        Array.Clear(_ticks);
        Array.Clear(_waitTicks);
        Array.Clear(_ownWaitTicks);
        _pendingWait = 0;
        _passTicks.Clear();
        _thisPass = 0;
        _passOps.Clear();
        Array.Clear(_opsAtPassStart);
        Passes = 0;
    }
}
