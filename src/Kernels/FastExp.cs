using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MiniLlm.Kernels;

/// <summary>
/// exp in fp32 for the softmax of attention and the SiLU of SwiGLU, within 2 ulp of the true value on normal
/// results (tested against double precision), denormal results rounded gradually and exp(−∞) = 0, exp(+∞) = +∞,
/// NaN kept. <see cref="System.Numerics.Tensors.TensorPrimitives.Exp(ReadOnlySpan{float}, Span{float})"/> computes
/// fp32 exp through double precision (≈ 9 ns a Vector512 here): a SwiGLU over 768 elements took 0.43 µs, most
/// of it in that exp, and a decode step of tiny-kjv runs 6 of them and 6 softmaxes over up to 8 × 512 scores.
/// <para>
/// Method (Cephes expf): n = round(x·log2 e), r = x − n·ln 2 in two FMA steps (ln 2 split so n·ln2_hi is exact),
/// exp(r) by a degree-7 polynomial on |r| ≤ ln 2 / 2, then · 2^n applied as two powers of two of half of n each,
/// so results between 2^−149 and 2^128 come out without a branch (with AVX-512, one vscalefps: the same bits). The
/// scalar form repeats the vector lanes' arithmetic operation by operation, so a tail element gets the same bits it
/// would get inside a vector.
/// </para>
/// </summary>
public static unsafe class FastExp
{
    private const float Log2E = 1.44269504088896341f;
    private const float Ln2Hi = 0.693359375f;          // 8 significant bits: n · Ln2Hi is exact for |n| ≤ 2^16
    private const float Ln2Lo = -2.12194440e-4f;
    private const float MaxX = 89f;                    // exp(89) > float.MaxValue: the product overflows to +∞
    private const float MinX = -104f;                  // exp(−104) < 2^−149 / 2: the product underflows to 0
    // Cephes expf minimax coefficients for exp(r) = 1 + r + r²·P(r), |r| ≤ ln 2 / 2.
    private const float P0 = 1.9875691500e-4f, P1 = 1.3981999507e-3f, P2 = 8.3334519073e-3f;
    private const float P3 = 4.1665795894e-2f, P4 = 1.6666665459e-1f, P5 = 5.0000001201e-1f;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp(Vector512<float> x)
    {
        var c = Vector512.Min(Vector512.Max(x, Vector512.Create(MinX)), Vector512.Create(MaxX));
        var n = Vector512.Round(c * Vector512.Create(Log2E));
        var r = Vector512.FusedMultiplyAdd(n, Vector512.Create(-Ln2Hi), c);
        r = Vector512.FusedMultiplyAdd(n, Vector512.Create(-Ln2Lo), r);
        var p = Vector512.FusedMultiplyAdd(Vector512.Create(P0), r, Vector512.Create(P1));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P2));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P3));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P4));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P5));
        p = Vector512.FusedMultiplyAdd(p, r * r, r) + Vector512<float>.One;
        // p·2^n in one instruction (vscalefps): the exact product rounded once, the bits of the two half-power
        // multiplies below, whose first step is always exact (0 differences over 32 M arguments, NaN, ±∞ and the
        // subnormal range included); 0.75 of the time of an exp.
        if (Avx512F.IsSupported) return Vector512.ConditionalSelect(Vector512.Equals(x, x), Avx512F.Scale(p, n), x);   // NaN in, NaN out
        var ni = Vector512.ConvertToInt32(n);
        var half = ni >> 1;
        var s1 = ((half + Vector512.Create(127)) << 23).AsSingle();
        var s2 = ((ni - half + Vector512.Create(127)) << 23).AsSingle();
        var e = p * s1 * s2;
        return Vector512.ConditionalSelect(Vector512.Equals(x, x), e, x);   // NaN in, NaN out
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Exp(Vector256<float> x)
    {
        var c = Vector256.Min(Vector256.Max(x, Vector256.Create(MinX)), Vector256.Create(MaxX));
        var n = Vector256.Round(c * Vector256.Create(Log2E));
        var r = Vector256.FusedMultiplyAdd(n, Vector256.Create(-Ln2Hi), c);
        r = Vector256.FusedMultiplyAdd(n, Vector256.Create(-Ln2Lo), r);
        var p = Vector256.FusedMultiplyAdd(Vector256.Create(P0), r, Vector256.Create(P1));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P2));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P3));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P4));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P5));
        p = Vector256.FusedMultiplyAdd(p, r * r, r) + Vector256<float>.One;
        var ni = Vector256.ConvertToInt32(n);
        var half = ni >> 1;
        var s1 = ((half + Vector256.Create(127)) << 23).AsSingle();
        var s2 = ((ni - half + Vector256.Create(127)) << 23).AsSingle();
        var e = p * s1 * s2;
        return Vector256.ConditionalSelect(Vector256.Equals(x, x), e, x);
    }

    /// <summary>The same arithmetic on one float (tails, and CPUs without vectors).</summary>
    public static float Exp(float x)
    {
        if (float.IsNaN(x)) return x;
        float c = Math.Min(Math.Max(x, MinX), MaxX);
        float n = MathF.Round(c * Log2E);   // ties to even, as Vector.Round
        float r = MathF.FusedMultiplyAdd(n, -Ln2Hi, c);
        r = MathF.FusedMultiplyAdd(n, -Ln2Lo, r);
        float p = MathF.FusedMultiplyAdd(P0, r, P1);
        p = MathF.FusedMultiplyAdd(p, r, P2);
        p = MathF.FusedMultiplyAdd(p, r, P3);
        p = MathF.FusedMultiplyAdd(p, r, P4);
        p = MathF.FusedMultiplyAdd(p, r, P5);
        p = MathF.FusedMultiplyAdd(p, r * r, r) + 1f;
        int ni = (int)n, half = ni >> 1;
        float s1 = BitConverter.Int32BitsToSingle((half + 127) << 23);
        float s2 = BitConverter.Int32BitsToSingle((ni - half + 127) << 23);
        return p * s1 * s2;
    }

    /// <summary>y[i] = exp(x[i]); y may be x.</summary>
    public static void Exp(ReadOnlySpan<float> x, Span<float> y)
    {
        if (y.Length < x.Length) throw new ArgumentException("destination shorter than source", nameof(y));
        fixed (float* xp = x, yp = y)
        {
            int n = x.Length, i = 0;
            var isa = SimdPolicy.Current;
            if (isa == SimdPolicy.Isa.V512)
                for (; i + 16 <= n; i += 16) Exp(Vector512.Load(xp + i)).Store(yp + i);
            if (isa != SimdPolicy.Isa.Scalar)
                for (; i + 8 <= n; i += 8) Exp(Vector256.Load(xp + i)).Store(yp + i);
            for (; i < n; i++) yp[i] = Exp(xp[i]);
        }
    }

    /// <summary>
    /// e[i] = exp(e[i] − shift) in place, returning Σ e[i] (softmax numerators and their sum in one pass; the sum
    /// taken in vector lanes, then across them; without Vector512 the tail after that, in order).
    /// </summary>
    public static float ExpShiftedSum(Span<float> e, float shift)
    {
        fixed (float* p = e)
        {
            int n = e.Length, i = 0;
            float sum = 0;
            var isa = SimdPolicy.Current;
            if (isa == SimdPolicy.Isa.V512 && Avx512F.IsSupported)
            {
                var s = Vector512.Create(shift);
                var acc = Vector512<float>.Zero;
                // The last 1–15 as one masked vector (ExpBlock): an attention row of a short prompt has 1–29 keys, and
                // taking its tail one scalar exp at a time was a third of a 29-token prefill's attention (perf).
                for (; i < n; i += 16) acc += ExpBlock(p + i, n - i, s);
                sum = Vector512.Sum(acc);
            }
            if (isa != SimdPolicy.Isa.Scalar && i + 8 <= n)
            {
                var s = Vector256.Create(shift);
                var acc = Vector256<float>.Zero;
                for (; i + 8 <= n; i += 8)
                {
                    var v = Exp(Vector256.Load(p + i) - s);
                    v.Store(p + i);
                    acc += v;
                }
                sum += Vector256.Sum(acc);
            }
            for (; i < n; i++)
            {
                float v = Exp(p[i] - shift);
                p[i] = v;
                sum += v;
            }
            return sum;
        }
    }

    /// <summary>gate[i] ← gate[i] · σ(gate[i]) · up[i], σ(g) = 1 / (1 + exp(−g)) (SwiGLU in one pass).</summary>
    public static void SwiGlu(float* gate, float* up, long count)
    {
        long i = 0;
        var isa = SimdPolicy.Current;
        if (isa == SimdPolicy.Isa.V512)
            for (; i + 16 <= count; i += 16)
            {
                var g = Vector512.Load(gate + i);
                var sig = Vector512<float>.One / (Vector512<float>.One + Exp(-g));
                (g * sig * Vector512.Load(up + i)).Store(gate + i);
            }
        if (isa != SimdPolicy.Isa.Scalar)
            for (; i + 8 <= count; i += 8)
            {
                var g = Vector256.Load(gate + i);
                var sig = Vector256<float>.One / (Vector256<float>.One + Exp(-g));
                (g * sig * Vector256.Load(up + i)).Store(gate + i);
            }
        for (; i < count; i++)
        {
            float g = gate[i];
            gate[i] = g * (1f / (1f + Exp(-g))) * up[i];
        }
    }

    /// <summary>
    /// A causal softmax row in place: p[0..keys) = exp(p − max) / Σ, and p[keys..padTo) = 0 (rows of a group of
    /// queries then share one ·V over padTo keys). The sum as <see cref="ExpShiftedSum"/> takes it.
    /// </summary>
    public static void CausalSoftmax(float* p, int keys, int padTo)
    {
        var row = new Span<float>(p, keys);
        Scale(p, keys, padTo, 1f / ExpShiftedSum(row, TensorPrimitives.Max(row)));
    }

    /// <summary>
    /// <see cref="CausalSoftmax"/> of four consecutive query rows: row i (at p + i·<paramref name="stride"/>) has
    /// keys0 + i keys. With Vector512 their exponentials are interleaved, four independent chains where one row's
    /// polynomial left the FMA units waiting on its own latency (a 29-token prompt's attention, 4 heads of tiny-kjv:
    /// 5.7 → 5.0 µs a layer); each row gets <see cref="CausalSoftmax"/>'s bits (the same vectors summed in the same
    /// order).
    /// </summary>
    public static void CausalSoftmax4(float* p, int stride, int keys0, int padTo)
    {
        float* p1 = p + stride, p2 = p1 + stride, p3 = p2 + stride;
        if (SimdPolicy.Current != SimdPolicy.Isa.V512 || !Avx512F.IsSupported)
        {
            CausalSoftmax(p, keys0, padTo); CausalSoftmax(p1, keys0 + 1, padTo);
            CausalSoftmax(p2, keys0 + 2, padTo); CausalSoftmax(p3, keys0 + 3, padTo);
            return;
        }
        var m0 = Vector512.Create(TensorPrimitives.Max(new ReadOnlySpan<float>(p, keys0)));
        var m1 = Vector512.Create(TensorPrimitives.Max(new ReadOnlySpan<float>(p1, keys0 + 1)));
        var m2 = Vector512.Create(TensorPrimitives.Max(new ReadOnlySpan<float>(p2, keys0 + 2)));
        var m3 = Vector512.Create(TensorPrimitives.Max(new ReadOnlySpan<float>(p3, keys0 + 3)));
        Vector512<float> s0 = default, s1 = default, s2 = default, s3 = default;
        for (int j = 0; j < keys0 + 3; j += 16)
        {
            s0 += ExpBlock(p + j, keys0 - j, m0);
            s1 += ExpBlock(p1 + j, keys0 + 1 - j, m1);
            s2 += ExpBlock(p2 + j, keys0 + 2 - j, m2);
            s3 += ExpBlock(p3 + j, keys0 + 3 - j, m3);
        }
        Scale(p, keys0, padTo, 1f / Vector512.Sum(s0));
        Scale(p1, keys0 + 1, padTo, 1f / Vector512.Sum(s1));
        Scale(p2, keys0 + 2, padTo, 1f / Vector512.Sum(s2));
        Scale(p3, keys0 + 3, padTo, 1f / Vector512.Sum(s3));
    }

    /// <summary>exp(p[k] − max) in place for the first min(n, 16) lanes (none when n ≤ 0); returns them, zero elsewhere.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> ExpBlock(float* p, int n, Vector512<float> max)
    {
        if (n >= 16)
        {
            var v = Exp(Vector512.Load(p) - max);
            v.Store(p);
            return v;
        }
        if (n <= 0) return Vector512<float>.Zero;
        var mask = FirstLanes(n);
        var e = Exp(Avx512F.MaskLoad(p, mask, Vector512<float>.Zero) - max);
        Avx512F.MaskStore(p, mask, e);
        return Vector512.ConditionalSelect(mask, e, Vector512<float>.Zero);
    }

    /// <summary>A lane mask of the first <paramref name="n"/> (1–15) lanes, for masked loads and stores.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> FirstLanes(int n) => Vector512.LessThan(Vector512<int>.Indices, Vector512.Create(n)).AsSingle();

    /// <summary>p[0..keys) ·= scale (vectors, the last one masked), p[keys..padTo) = 0.</summary>
    private static void Scale(float* p, int keys, int padTo, float scale)
    {
        int j = 0;
        if (SimdPolicy.Current == SimdPolicy.Isa.V512 && Avx512F.IsSupported)
        {
            var s = Vector512.Create(scale);
            for (; j + 16 <= keys; j += 16) (Vector512.Load(p + j) * s).Store(p + j);
            if (j < keys)
            {
                var mask = FirstLanes(keys - j);
                Avx512F.MaskStore(p + j, mask, Avx512F.MaskLoad(p + j, mask, Vector512<float>.Zero) * s);
                j = keys;
            }
        }
        for (; j < keys; j++) p[j] *= scale;
        new Span<float>(p + keys, padTo - keys).Clear();
    }
}
