using BenchmarkDotNet.Attributes;
using MiniLlm.Kernels;

namespace MiniLlm.Bench;

/// <summary>What one parallel kernel launch costs with nothing to do: the floor under every per-token op.</summary>
public class WorkerPoolBench
{
    [Params(1, 8, 64)] public int Chunks;

    private WorkerPool _pool = null!;
    private readonly Nop _job = new();

    [GlobalSetup]
    public void Setup() => _pool = new WorkerPool(WorkerPool.DefaultThreads);

    [Benchmark]
    public void Dispatch() => _pool.Run(_job, Chunks);

    [GlobalCleanup]
    public void Cleanup() => _pool.Dispose();

    private sealed class Nop : ParallelJob
    {
        public override void Execute(int chunk, int worker) { }
    }
}
