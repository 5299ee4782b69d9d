using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;
using MiniLlm.Kernels;

namespace MiniLlm.Bench;

/// <summary>Y = X·Wᵀ for the shapes of stories110M (d 768, f 2048): GEMV (M = 1), batched decode and prefill.</summary>
[MemoryDiagnoser]
public unsafe class MatMulBench
{
    [Params(1, 8, 512)] public int M;
    [Params(WeightType.F32, WeightType.BF16)] public WeightType Type;
    public int K = 768, N = 2048;

    private WorkerPool _pool = null!;
    private MatMul _mm = null!;
    private float* _x, _y;
    private void* _w;

    [GlobalSetup]
    public void Setup()
    {
        _pool = new WorkerPool(WorkerPool.DefaultThreads);
        _mm = new MatMul(_pool);
        _x = (float*)NativeMemory.AlignedAlloc((nuint)(M * K * 4), 64);
        _y = (float*)NativeMemory.AlignedAlloc((nuint)(M * N * 4), 64);
        int es = Type == WeightType.F32 ? 4 : 2;
        _w = NativeMemory.AlignedAlloc((nuint)(N * K * es), 64);
        var r = new Random(1);
        for (int i = 0; i < M * K; i++) _x[i] = (float)r.NextDouble();
        for (int i = 0; i < N * K * es / 2; i++) ((ushort*)_w)[i] = (ushort)(0x3c00 + r.Next(256));
    }

    [Benchmark]
    public void Run() => _mm.Run(_x, M, new WeightMatrix((nint)_w, Type, N, K), _y);

    [GlobalCleanup]
    public void Cleanup()
    {
        _pool.Dispose();
        NativeMemory.AlignedFree(_x);
        NativeMemory.AlignedFree(_y);
        NativeMemory.AlignedFree(_w);
    }
}
