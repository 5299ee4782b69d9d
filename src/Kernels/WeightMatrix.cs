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
/// The memory is owned elsewhere (usually a memory-mapped checkpoint). A block of a matrix (<see cref="Block"/>)
/// is a matrix too, whose rows lie <see cref="RowBytes"/> apart, more than its own columns take.
/// </summary>
public readonly unsafe struct WeightMatrix
{
    public WeightMatrix(nint pointer, WeightType type, int rows, int cols)
    {
        Pointer = pointer; Type = type; Rows = rows; Cols = cols;
        RowBytes = type == WeightType.Q8 ? (long)cols / Q8Load.Block * Q8Load.BlockBytes : (long)cols * PlainElementSize(type);
    }

    private WeightMatrix(nint pointer, WeightType type, int rows, int cols, long rowBytes)
    {
        Pointer = pointer; Type = type; Rows = rows; Cols = cols; RowBytes = rowBytes;
    }

    public nint Pointer { get; }
    public WeightType Type { get; }
    public int Rows { get; }
    public int Cols { get; }

    /// <summary>
    /// Bytes per element for the plain types (Q8 has no per-element size: see <see cref="RowBytes"/>). The throw sits
    /// in a helper so this getter, and <see cref="Row"/>, inline into the kernels: with the throw inside it was a call
    /// (3.6 % of a tiny-kjv 29-token prefill's samples, from the packed GEMM's row pointers).
    /// </summary>
    public int ElementSize => Type == WeightType.Q8 ? NoElementSize() : PlainElementSize(Type);
    /// <summary>Bytes from one row to the next (computed once: every kernel asks for row pointers in its loops).</summary>
    public long RowBytes { get; }

    /// <summary>Bytes that <paramref name="k"/> consecutive weights of a row take (Q8: k a whole number of blocks).</summary>
    public long BytesOf(int k) => Type == WeightType.Q8 ? (long)k / Q8Load.Block * Q8Load.BlockBytes : (long)k * PlainElementSize(Type);

    /// <summary>
    /// Rows [n0, n1) × columns [c0, c1) of this matrix, in place (fp32, f16 or bf16): one thread's share of a
    /// product cut by rows, by columns, or both.
    /// </summary>
    public WeightMatrix Block(int n0, int n1, int c0, int c1)
    {
        if (Type == WeightType.Q8 || n0 < 0 || n1 > Rows || n0 >= n1 || c0 < 0 || c1 > Cols || c0 >= c1)
            throw new ArgumentException($"block rows {n0}..{n1} × columns {c0}..{c1} of a {Type} matrix [{Rows} × {Cols}]: plain types, non-empty ranges inside the matrix");
        return new WeightMatrix(Row(n0) + (nint)BytesOf(c0), Type, n1 - n0, c1 - c0, RowBytes);
    }

    public long ByteLength => Rows * BytesOf(Cols);   // the weights' own bytes (a block's rows lie further apart)
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
