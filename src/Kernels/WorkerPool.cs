namespace MiniLlm.Kernels;

/// <summary>A unit of parallel work: <see cref="Execute"/> runs once per chunk index, on some worker.</summary>
public abstract class ParallelJob
{
    /// <param name="chunk">0 ≤ chunk &lt; the count given to <see cref="WorkerPool.Run"/>.</param>
    /// <param name="worker">0 ≤ worker &lt; <see cref="WorkerPool.Threads"/>; indexes per-worker scratch.</param>
    public abstract void Execute(int chunk, int worker);
}

/// <summary>
/// A persistent pool: <c>Threads − 1</c> background threads plus the caller. <see cref="Run"/> hands out chunk
/// indices through one atomic counter, so uneven chunks balance themselves. No thread is created and nothing is
/// allocated per call; idle workers spin briefly (the next kernel usually follows within microseconds), then sleep.
/// </summary>
public sealed class WorkerPool : IDisposable
{
    private const int SpinIterations = 20_000;

    private readonly Thread[] _workers;
    private readonly object _gate = new();
    private ParallelJob? _job;
    private int _chunks;
    private int _next;
    private int _running;
    private long _generation;
    private int _sleeping;          // workers blocked in Monitor.Wait (dispatches pulse only when some are)
    private bool _pinned;           // chunk c runs on worker c mod Threads (RunPinned) instead of the next free one
    private volatile bool _stopping;
    private Exception? _error;

    public int Threads { get; }

    public WorkerPool(int threads)
    {
        if (threads < 1) throw new ArgumentOutOfRangeException(nameof(threads), "threads must be at least 1");
        Threads = threads;
        _workers = new Thread[threads - 1];
        for (int i = 0; i < _workers.Length; i++)
        {
            int id = i + 1;
            _workers[i] = new Thread(() => WorkerLoop(id)) { IsBackground = true, Name = $"minillm-worker-{id}" };
            _workers[i].Start();
        }
    }

    /// <summary>Threads matching the machine's cores (what the OS reports as available to this process).</summary>
    public static int DefaultThreads => Math.Max(1, Environment.ProcessorCount);

    /// <summary>Runs <paramref name="job"/> for chunks 0..count−1 and returns when all are done. Not reentrant.</summary>
    public void Run(ParallelJob job, int count) => Dispatch(job, count, pinned: false);

    /// <summary>
    /// Runs chunk c on worker c mod <see cref="Threads"/>, the same worker every call: no balancing, but each core
    /// reads the same part of the data every time, so that part stays in the core's own caches. On this project's
    /// VMs the two vCPUs do not share one L3: two threads re-reading fixed halves of 24 MiB read 97–113 GB/s,
    /// swapping halves every pass 66–72 (C probe, alternating).
    /// </summary>
    public void RunPinned(ParallelJob job, int count) => Dispatch(job, count, pinned: true);

    private void Dispatch(ParallelJob job, int count, bool pinned)
    {
        if (count <= 0) return;
        if (_workers.Length == 0 || count == 1)
        {
            for (int i = 0; i < count; i++) job.Execute(i, 0);
            return;
        }
        _job = job;
        _pinned = pinned;
        _chunks = count;
        _next = 0;
        _error = null;
        Volatile.Write(ref _running, _workers.Length);
        // Spinning workers see the new generation at once; the lock and the pulse are paid only when one of them
        // has gone to sleep (an empty 2-thread dispatch: 0.69 µs with them every time, 0.52 µs without; tighter
        // spinning, SpinWait(1) on either side, made it 1.2 µs: the spinners contend for the flags' cache lines).
        Interlocked.Increment(ref _generation);
        if (Volatile.Read(ref _sleeping) != 0)
            lock (_gate) Monitor.PulseAll(_gate);
        RunChunks(job, 0);
        // A fixed short pause between reads: SpinWait.SpinOnce backs off exponentially, so the caller noticed the
        // last worker 0.3–1.4 µs after it finished (0.14–0.36 µs so; timestamps around a 768 × 768 bf16 GEMV, alternating;
        // an empty dispatch 0.35 µs against 0.40).
        while (Volatile.Read(ref _running) != 0) Thread.SpinWait(1);
        _job = null;
        if (_error is { } e) throw new AggregateException("a worker failed", e);
    }

    private void RunChunks(ParallelJob job, int worker)
    {
        try
        {
            if (_pinned)
            {
                for (int c = worker; c < _chunks; c += Threads) job.Execute(c, worker);
                return;
            }
            int i;
            while ((i = Interlocked.Increment(ref _next) - 1) < _chunks) job.Execute(i, worker);
        }
        catch (Exception e)
        {
            _error = e;
            Volatile.Write(ref _next, int.MaxValue / 2); // stop handing out chunks
        }
    }

    private void WorkerLoop(int id)
    {
        long seen = 0;
        while (true)
        {
            int spins = 0;
            while (Volatile.Read(ref _generation) == seen && !_stopping)
            {
                if (spins++ < SpinIterations) Thread.SpinWait(8);
                else
                {
                    lock (_gate)
                    {
                        Interlocked.Increment(ref _sleeping);
                        // _sleeping is raised before the generation is read again, and Run raises the generation
                        // before it reads _sleeping (both interlocked): either this worker sees the new generation
                        // or Run sees a sleeper and pulses — after this thread's Wait has released the lock.
                        while (Volatile.Read(ref _generation) == seen && !_stopping) Monitor.Wait(_gate);
                        Interlocked.Decrement(ref _sleeping);
                    }
                }
            }
            if (_stopping) return;
            seen = Volatile.Read(ref _generation);
            RunChunks(_job!, id);
            Interlocked.Decrement(ref _running);
        }
    }

    public void Dispose()
    {
        _stopping = true;
        lock (_gate) Monitor.PulseAll(_gate);
        foreach (var t in _workers) t.Join();
    }
}
