using System.Numerics.Tensors;

namespace MiniLlm.Kernels;

/// <summary>Row-wise elementwise kernels of the forward pass. All fp32, all in place or into caller buffers.</summary>
public static unsafe class Ops
{
    /// <summary>
    /// out[r] = x[r] · rsqrt(mean(x[r]²) + eps) ⊙ weight, for each of <paramref name="rows"/> rows of length n
    /// (HF LlamaRMSNorm order: normalise, then scale). out may equal x.
    /// </summary>
    public static void RmsNorm(float* x, float* weight, float* output, int rows, int n, float eps)
    {
        var w = new ReadOnlySpan<float>(weight, n);
        for (int r = 0; r < rows; r++)
        {
            var xr = new ReadOnlySpan<float>(x + (long)r * n, n);
            var or = new Span<float>(output + (long)r * n, n);
            float ms = TensorPrimitives.SumOfSquares(xr) / n;
            float inv = 1f / MathF.Sqrt(ms + eps);
            TensorPrimitives.Multiply(xr, inv, or);
            TensorPrimitives.Multiply(or, w, or);
        }
    }

    /// <summary>gate ← silu(gate) ⊙ up over n elements (SwiGLU), one pass with <see cref="FastExp"/>.</summary>
    public static void SwiGlu(float* gate, float* up, long n) => FastExp.SwiGlu(gate, up, n);

    /// <summary>x ← x + y over n elements (residual add).</summary>
    public static void AddInPlace(float* x, float* y, long n)
    {
        const int Chunk = 1 << 20;
        for (long i = 0; i < n; i += Chunk)
        {
            int len = (int)Math.Min(Chunk, n - i);
            TensorPrimitives.Add(new ReadOnlySpan<float>(x + i, len), new ReadOnlySpan<float>(y + i, len), new Span<float>(x + i, len));
        }
    }

    /// <summary>In-place numerically stable softmax over n scores.</summary>
    public static void Softmax(float* x, int n)
    {
        var s = new Span<float>(x, n);
        TensorPrimitives.SoftMax(s, s);
    }

    /// <summary>Index of the largest of n values (first on ties).</summary>
    public static int ArgMax(ReadOnlySpan<float> x) => TensorPrimitives.IndexOfMax(x);

}
