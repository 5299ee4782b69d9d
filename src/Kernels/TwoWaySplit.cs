using System.Diagnostics;

namespace MiniLlm.Kernels;

/// <summary>
/// Where one call's rows are cut between the two threads of a pinned dispatch, following the cores' speeds: after each
/// call, worker 0's share moves a quarter of the way to the share that would have ended both halves together (each
/// side's rows over its time since the dispatch). The host's two vCPUs are not always equally fast, so fixed halves
/// win in some minutes and lose in others (see <see cref="MatMul.SplitDramGemv"/>).
/// </summary>
internal sealed class TwoWaySplit
{
    public const double MinShare = 0.25, MaxShare = 0.75;

    private double _share = 0.5;
    private readonly long[] _end = new long[16];   // each worker's last chunk end (Stopwatch ticks), 64 bytes apart
    private long _start;
    private double _first;
    private bool _timing;

    /// <summary>Worker 0's share of the rows of the next call.</summary>
    public double Share
    {
        get => _share;
        set => _share = Math.Clamp(value, MinShare, MaxShare);
    }

    /// <summary>Starts timing a call in which worker 0 takes <paramref name="firstFraction"/> of the rows.</summary>
    public void Begin(double firstFraction)
    {
        _first = firstFraction;
        _end[0] = _end[8] = 0;
        _timing = true;
        _start = Stopwatch.GetTimestamp();
    }

    /// <summary>Called by a worker after each of its chunks (the last call wins).</summary>
    public void ChunkDone(int worker)
    {
        if (_timing) _end[8 * worker] = Stopwatch.GetTimestamp();
    }

    /// <summary>Ends the call's timing and moves the share.</summary>
    public void End()
    {
        if (!_timing) return;
        _timing = false;
        long d0 = _end[0] - _start, d1 = _end[8] - _start;
        if (d0 <= 0 || d1 <= 0 || _first <= 0 || _first >= 1) { _share = 0.5; return; }
        double v0 = _first / d0, v1 = (1 - _first) / d1;   // fractions of the call's rows per tick
        _share = Math.Clamp(_share + 0.25 * (v0 / (v0 + v1) - _share), MinShare, MaxShare);
    }
}
