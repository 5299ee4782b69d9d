using System.Runtime.InteropServices;

namespace MiniLlm.Engine;

/// <summary>A 64-byte-aligned native float buffer: outside the GC heap, so kernels take raw pointers to it for free.</summary>
public sealed unsafe class NativeBuffer : IDisposable
{
    public float* Pointer { get; private set; }
    public long Length { get; }

    public NativeBuffer(long length)
    {
        Length = length;
        Pointer = (float*)NativeMemory.AlignedAlloc((nuint)Math.Max(1, length) * sizeof(float), 64);
        NativeMemory.Clear(Pointer, (nuint)Math.Max(1, length) * sizeof(float));
    }

    public Span<float> Span => new(Pointer, checked((int)Length));

    public void Dispose()
    {
        if (Pointer == null) return;
        NativeMemory.AlignedFree(Pointer);
        Pointer = null;
    }
}
