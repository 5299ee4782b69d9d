using System.Diagnostics;

namespace MiniLlm.Kernels;

/// <summary>
/// Where one call's rows are cut between the two threads of a pinned dispatch, following the cores' speeds: after each
/// call, worker 0's share moves a quarter of the way to the share that would have ended both halves together (each
/// side's rows over its time since the dispatch). The host's two vCPUs are not always equally fast, so fixed halves
/// win in some minutes and lose in others (see <see cref="MatMul.SplitDramGemv"/>).
/// </summary>
public sealed class TwoWaySplit
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

    /// <summary>
    /// Runs a two-chunks-a-product plan (chunk c on worker c mod 2) in which worker 0 takes
    /// <paramref name="firstFraction"/> of the rows, timed; the job calls <see cref="ChunkDone"/> after each chunk.
    /// </summary>
    public void Run(WorkerPool pool, ParallelJob job, int chunks, double firstFraction)
    {
        Begin(firstFraction);
        pool.RunPinned(job, chunks);
        End();
    }

    private void Begin(double firstFraction)
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
    private void End()
    {
        if (!_timing) return;
        _timing = false;
        _share = NextShare(_share, _first, _end[0] - _start, _end[8] - _start);
    }

    /// <summary>
    /// The share after a call in which worker 0 took <paramref name="first"/> of the rows and the workers finished
    /// <paramref name="d0"/> and <paramref name="d1"/> ticks after the dispatch: a quarter of the way from
    /// <paramref name="share"/> to the share that would have ended both together. Back to halves when a side did
    /// nothing or was not timed.
    /// </summary>
    public static double NextShare(double share, double first, long d0, long d1)
    {
        if (d0 <= 0 || d1 <= 0 || first <= 0 || first >= 1) return 0.5;
        double v0 = first / d0, v1 = (1 - first) / d1;   // fractions of the call's rows per tick
        return Math.Clamp(share + 0.25 * (v0 / (v0 + v1) - share), MinShare, MaxShare);
    }
}
