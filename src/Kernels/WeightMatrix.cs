namespace MiniLlm.Kernels;

/// <summary>Element type of a weight matrix as stored (activations are always fp32).</summary>
public enum WeightType
{
    F32,
    F16,
    BF16,
    /// <summary>Q8_0-style: blocks of 32 weights, each an fp32 scale followed by 32 int8 (36 bytes, 1.125 bytes per weight).</summary>
    Q8,
}

/// <summary>
/// A row-major weight matrix W [Rows × Cols] in its stored type, as HF stores a linear layer (out × in).
/// The memory is owned elsewhere (usually a memory-mapped checkpoint).
/// </summary>
public readonly unsafe struct WeightMatrix(nint pointer, WeightType type, int rows, int cols)
{
    public nint Pointer { get; } = pointer;
    public WeightType Type { get; } = type;
    public int Rows { get; } = rows;
    public int Cols { get; } = cols;

    /// <summary>
    /// Bytes per element for the plain types (Q8 has no per-element size: see <see cref="RowBytes"/>). The throw sits
    /// in a helper so this getter, and <see cref="Row"/>, inline into the kernels: with the throw inside it was a call
    /// (3.6 % of a tiny-kjv 29-token prefill's samples, from the packed GEMM's row pointers).
    /// </summary>
    public int ElementSize => Type == WeightType.Q8 ? NoElementSize() : PlainElementSize(Type);
    /// <summary>Bytes of one row (computed once: every kernel asks for row pointers in its loops).</summary>
    public long RowBytes { get; } = type == WeightType.Q8 ? (long)cols / Q8Load.Block * Q8Load.BlockBytes : (long)cols * PlainElementSize(type);
    public long ByteLength => Rows * RowBytes;
    public nint Row(int r) => Pointer + (nint)(r * RowBytes);

    private static int PlainElementSize(WeightType type) => type == WeightType.F32 ? 4 : 2;

    [System.Diagnostics.CodeAnalysis.DoesNotReturn, System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.NoInlining)]
    private static int NoElementSize() => throw new InvalidOperationException("Q8 rows are blocks; use RowBytes");

    /// <summary>Row <paramref name="r"/> widened to fp32 into <paramref name="dst"/> (embedding gather).</summary>
    public void WidenRow(int r, Span<float> dst)
    {
        if ((uint)r >= (uint)Rows) throw new ArgumentOutOfRangeException(nameof(r), $"row {r} outside [0, {Rows})");
        if (dst.Length < Cols) throw new ArgumentException("destination shorter than a row", nameof(dst));
        fixed (float* d = dst) Widen.ToF32(Type, Row(r), d, Cols);
    }
}
