using System.Runtime.InteropServices;

namespace MiniLlm.Kernels;

/// <summary>
/// One native float buffer per worker of a pool, for one call's copy of something every worker reads (packed X):
/// each worker fills its own at its first chunk of a call (<see cref="FirstUse"/>) rather than reading one thread's
/// copy across cores (the project's two vCPUs share no cache). Grown, never shrunk; nothing is allocated per call.
/// </summary>
internal sealed unsafe class PerWorkerBuffers
{
    private readonly float*[] _buffers;
    private long _floats;
    private long _call;                  // this call's number, and the call each worker last filled its buffer for
    private readonly long[] _filled;

    public PerWorkerBuffers(int workers)
    {
        _buffers = new float*[workers];
        _filled = new long[workers];
    }

    /// <summary>Starts a call whose buffers hold <paramref name="floats"/> floats: every worker's buffer counts as unfilled.</summary>
    public void NewCall(long floats)
    {
        Grow(_buffers, ref _floats, floats);
        _call++;
    }

    public float* this[int worker] => _buffers[worker];

    /// <summary>True the first time <paramref name="worker"/> asks in this call: it fills its buffer now.</summary>
    public bool FirstUse(int worker)
    {
        if (_filled[worker] == _call) return false;
        _filled[worker] = _call;
        return true;
    }

    /// <summary>Every buffer of <paramref name="buffers"/> holds at least <paramref name="need"/> floats (grown, contents dropped).</summary>
    public static void Grow(float*[] buffers, ref long floats, long need)
    {
        if (need <= floats) return;
        for (int i = 0; i < buffers.Length; i++)
        {
            if (buffers[i] != null) NativeMemory.AlignedFree(buffers[i]);
            buffers[i] = (float*)NativeMemory.AlignedAlloc((nuint)need * sizeof(float), 64);
        }
        floats = need;
    }
}
