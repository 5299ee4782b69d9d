using MiniLlm.Kernels;

namespace MiniLlm.Tests;

/// <summary>The pool's sleep and wake-up path (the spinning path is exercised by every kernel test).</summary>
public class WorkerPoolTests
{
    [Fact]
    public void WorkerPoolWakesWorkersThatWentToSleep()
    {
        // Workers fall asleep after a few ms of spinning; a dispatch must wake them (never hang, never lose a chunk)
        // whether it lands long after they slept or right around the moment they go to sleep.
        using var pool = new WorkerPool(3);
        var job = new SlowCountingJob(64);
        var rng = new Random(7);
        for (int rep = 0; rep < 40; rep++)
        {
            Thread.Sleep(rep % 8 == 0 ? 60 : rng.Next(0, 12));
            job.Reset();
            RunOrFail(() => pool.Run(job, 64));
            Assert.All(job.Hits, h => Assert.Equal(1, h));
        }
    }

    [Fact]
    public void PinnedDispatchRunsEachChunkOnceOnItsOwnWorker()
    {
        // Chunk c belongs to worker c mod Threads on every call (that is what keeps a core's share of the weights in
        // its own cache), including calls that have to wake sleeping workers first.
        using var pool = new WorkerPool(3);
        var job = new SlowCountingJob(11);
        for (int rep = 0; rep < 12; rep++)
        {
            if (rep % 4 == 0) Thread.Sleep(60);
            job.Reset();
            RunOrFail(() => pool.RunPinned(job, 11));
            Assert.All(job.Hits, h => Assert.Equal(1, h));
            for (int c = 0; c < 11; c++) Assert.Equal(c % 3, job.Worker[c]);
        }
    }

    /// <summary>
    /// Runs a dispatch on a thread of its own and fails if it has not returned within 30 s (a hung pool). Not on the
    /// .NET thread pool: with the rest of the suite running beside it on two cores, a queued Task.Run item could wait
    /// for a pool thread long enough to read as a hang (one clean-clone CI run timed out at 10 s that way, or hung;
    /// 40 loops of this class beside 6 runs of the whole suite did not repeat it).
    /// </summary>
    private static void RunOrFail(Action dispatch)
    {
        Exception? error = null;
        var t = new Thread(() => { try { dispatch(); } catch (Exception e) { error = e; } }) { IsBackground = true };
        t.Start();
        Assert.True(t.Join(TimeSpan.FromSeconds(30)), "the dispatch did not return within 30 s: the pool hung");
        if (error != null) throw new Xunit.Sdk.XunitException($"the dispatch threw: {error}");
    }

    /// <summary>Counts each chunk's runs; chunks slow enough that every worker joins in.</summary>
    private sealed class SlowCountingJob(int n) : ParallelJob
    {
        public int[] Hits { get; } = new int[n];
        public int[] Worker { get; } = new int[n];
        public void Reset() { Array.Clear(Hits); Array.Fill(Worker, -1); }
        public override void Execute(int chunk, int worker)
        {
            Worker[chunk] = worker;
            Interlocked.Increment(ref Hits[chunk]);
            Thread.SpinWait(2000);
        }
    }

    /// <summary>The two-way split moves a quarter of the way toward the cut that would have ended both workers together.</summary>
    [Fact]
    public void TwoWaySplitFollowsTheFasterWorker()
    {
        // Equal halves, worker 1 twice as slow: both would end together with 2/3 to worker 0.
        Assert.Equal(0.5 + 0.25 * (2.0 / 3 - 0.5), TwoWaySplit.NextShare(0.5, 0.5, 1000, 2000), 12);
        // Already balanced (worker 0 took 0.6 of the rows and both took as long): no move.
        Assert.Equal(0.6, TwoWaySplit.NextShare(0.6, 0.6, 1500, 1500), 12);
        // Worker 0 much slower: the share falls, but never below the floor.
        double s = 0.5;
        for (int i = 0; i < 50; i++) s = TwoWaySplit.NextShare(s, s, 100_000, 1000);
        Assert.Equal(TwoWaySplit.MinShare, s, 12);
        // A side that did nothing or was not timed: back to halves.
        Assert.Equal(0.5, TwoWaySplit.NextShare(0.7, 0.7, 0, 1000));
        Assert.Equal(0.5, TwoWaySplit.NextShare(0.3, 0, 1000, 1000));
    }
}
