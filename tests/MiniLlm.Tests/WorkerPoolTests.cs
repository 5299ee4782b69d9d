using MiniLlm.Kernels;

namespace MiniLlm.Tests;

/// <summary>The pool's sleep and wake-up path (the spinning path is exercised by every kernel test).</summary>
public class WorkerPoolTests
{
    [Fact]
    public async Task WorkerPoolWakesWorkersThatWentToSleep()
    {
        // Workers fall asleep after a few ms of spinning; a dispatch must wake them (never hang, never lose a chunk)
        // whether it lands long after they slept or right around the moment they go to sleep.
        using var pool = new WorkerPool(3);
        var job = new SlowCountingJob(64);
        var rng = new Random(7);
        for (int rep = 0; rep < 40; rep++)
        {
            await Task.Delay(rep % 8 == 0 ? 60 : rng.Next(0, 12));
            job.Reset();
            await Task.Run(() => pool.Run(job, 64)).WaitAsync(TimeSpan.FromSeconds(10));   // TimeoutException = hung
            Assert.All(job.Hits, h => Assert.Equal(1, h));
        }
    }

    [Fact]
    public async Task PinnedDispatchRunsEachChunkOnceOnItsOwnWorker()
    {
        // Chunk c belongs to worker c mod Threads on every call (that is what keeps a core's share of the weights in
        // its own cache), including calls that have to wake sleeping workers first.
        using var pool = new WorkerPool(3);
        var job = new SlowCountingJob(11);
        for (int rep = 0; rep < 12; rep++)
        {
            if (rep % 4 == 0) await Task.Delay(60);
            job.Reset();
            await Task.Run(() => pool.RunPinned(job, 11)).WaitAsync(TimeSpan.FromSeconds(10));
            Assert.All(job.Hits, h => Assert.Equal(1, h));
            for (int c = 0; c < 11; c++) Assert.Equal(c % 3, job.Worker[c]);
        }
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
}
