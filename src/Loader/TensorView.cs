namespace MiniLlm.Loader;

/// <summary>
/// A zero-copy view of one tensor inside a memory-mapped safetensors file, in its stored dtype.
/// Valid while the owning <see cref="SafetensorsFile"/> is open.
/// </summary>
public readonly unsafe struct TensorView
{
    public string Name { get; }
    public DType DType { get; }
    public long[] Shape { get; }
    public nint Pointer { get; }
    public long ByteLength { get; }
    /// <summary>File the tensor lives in (for error messages).</summary>
    public string File { get; }

    public TensorView(string name, DType dtype, long[] shape, nint pointer, long byteLength, string file)
    {
        Name = name; DType = dtype; Shape = shape; Pointer = pointer; ByteLength = byteLength; File = file;
    }

    public long ElementCount
    {
        get { long n = 1; foreach (var d in Shape) n *= d; return n; }
    }

    public string ShapeText => "[" + string.Join(", ", Shape) + "]";

    /// <summary>The raw bytes. Only for tensors under 2 GiB (all of a small model's).</summary>
    public ReadOnlySpan<byte> Bytes => new((void*)Pointer, checked((int)ByteLength));

    /// <summary>Element <paramref name="i"/> widened to fp32, whatever the stored dtype.</summary>
    public float GetFloat(long i)
    {
        if ((ulong)i >= (ulong)ElementCount) throw new ArgumentOutOfRangeException(nameof(i));
        return DType switch
        {
            DType.F32 => ((float*)Pointer)[i],
            DType.F16 => (float)((Half*)Pointer)[i],
            DType.BF16 => BitConverter.UInt32BitsToSingle((uint)((ushort*)Pointer)[i] << 16),
            _ => throw new InvalidOperationException($"{File}: tensor '{Name}' holds {DTypes.Name(DType)} data, not numbers to widen"),
        };
    }
}
