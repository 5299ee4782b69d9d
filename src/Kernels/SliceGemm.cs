namespace MiniLlm.Kernels;

/// <summary>
/// One thread's share of a prefill product, on that thread alone: Y[m × n] = X[m × k] · Wᵀ where W may be a block of
/// a larger matrix (<see cref="WeightMatrix.Block"/>: rows for a thread's heads or MLP slice, columns for its part of
/// o or down), X a column block of a wider activation (rows <c>ldx</c> floats apart) and Y one too (each product's
/// <see cref="MatMul.Product.Ldy"/>). The packed GEMM's kernels (<see cref="PackedGemm"/>) without its dispatch: the
/// tensor-parallel prefill runs one of these per thread, each on the weights that thread also reads when it decodes.
/// fp32 or bf16 weights, Vector512.
/// </summary>
public sealed unsafe class SliceGemm
{
    private readonly PackedGemm _packed = new(1);

    /// <summary>Whether <see cref="Run"/> takes weights of this type with this ISA.</summary>
    public static bool Supported(WeightType type) => MatMul.SliceSupported(type);

    /// <summary>Every product shares X [m × K] (K = every W's column count), read with row stride <paramref name="ldx"/>.</summary>
    public void Run(float* x, int ldx, int m, ReadOnlySpan<MatMul.Product> products)
    {
        if (m <= 0 || products.IsEmpty) return;
        int k = products[0].W.Cols;
        foreach (var p in products)
        {
            if (!Supported(p.W.Type)) throw new ArgumentException($"SliceGemm takes fp32/bf16 weights with V512 (got {p.W.Type}, {SimdPolicy.Current})", nameof(products));
            if (p.W.Cols != k) throw new ArgumentException($"weights of one group must share K (got {p.W.Cols} and {k})", nameof(products));
            if (p.Ldy < p.W.Rows) throw new ArgumentException($"Y rows of {p.Ldy} floats cannot hold {p.W.Rows} outputs", nameof(products));
        }
        if (ldx < k) throw new ArgumentOutOfRangeException(nameof(ldx), $"X rows of {ldx} floats cannot hold K = {k}");
        _packed.RunSerial(x, ldx, m, k, products, SimdPolicy.Current);
    }
}
