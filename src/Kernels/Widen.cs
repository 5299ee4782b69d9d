using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MiniLlm.Kernels;

/// <summary>
/// How a kernel reads weights of one stored type as fp32: a whole vector (widened in registers) or one element.
/// One struct per type so the GEMM/GEMV drivers are written once and specialised by the JIT.
/// </summary>
public unsafe interface IWeightLoad
{
    /// <summary>16 consecutive weights starting at element <paramref name="k"/> of row <paramref name="row"/>.</summary>
    static abstract Vector512<float> Load512(nint row, int k);
    /// <summary>8 consecutive weights.</summary>
    static abstract Vector256<float> Load256(nint row, int k);
    static abstract float Load1(nint row, int k);
    /// <summary>Weight k of the row, widened and broadcast to every lane.</summary>
    static abstract Vector512<float> Broadcast512(nint row, int k);
    static abstract Vector256<float> Broadcast256(nint row, int k);
}

public unsafe struct F32Load : IWeightLoad
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Load512(nint row, int k) => Vector512.Load((float*)row + k);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Load256(nint row, int k) => Vector256.Load((float*)row + k);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Load1(nint row, int k) => ((float*)row)[k];
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Broadcast512(nint row, int k) => Vector512.Create(((float*)row)[k]);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Broadcast256(nint row, int k) => Vector256.Create(((float*)row)[k]);
}

/// <summary>bf16 is the top half of an fp32: zero-extend to 32 bits and shift left 16.</summary>
public unsafe struct Bf16Load : IWeightLoad
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Load512(nint row, int k)
    {
        var h = Vector256.Load((ushort*)row + k);
        Vector512<uint> w = Avx512F.IsSupported
            ? Avx512F.ConvertToVector512UInt32(h)
            : Vector512.Create(Vector256.WidenLower(h), Vector256.WidenUpper(h));
        return Vector512.ShiftLeft(w, 16).AsSingle();
    }
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Load256(nint row, int k)
    {
        var h = Vector128.Load((ushort*)row + k);
        Vector256<uint> w = Avx2.IsSupported ? Avx2.ConvertToVector256Int32(h).AsUInt32() : Vector256.Create(Vector128.WidenLower(h), Vector128.WidenUpper(h));
        return Vector256.ShiftLeft(w, 16).AsSingle();
    }
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Load1(nint row, int k) => BitConverter.UInt32BitsToSingle((uint)((ushort*)row)[k] << 16);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Broadcast512(nint row, int k) => Vector512.Create(Load1(row, k));
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Broadcast256(nint row, int k) => Vector256.Create(Load1(row, k));
}

/// <summary>
/// IEEE half → fp32 without an F16C intrinsic: move exponent+mantissa into fp32 position and rescale by 2^112
/// (which also turns half subnormals into the right fp32 values); Inf/NaN get an all-ones exponent; then the sign.
/// </summary>
public unsafe struct F16Load : IWeightLoad
{
    private const float Rescale = 5.192296858534828e33f; // 2^112 = 2^(127-15)

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Load512(nint row, int k)
    {
        var h = Vector256.Load((ushort*)row + k);
        Vector512<uint> u = Avx512F.IsSupported
            ? Avx512F.ConvertToVector512UInt32(h)
            : Vector512.Create(Vector256.WidenLower(h), Vector256.WidenUpper(h));
        var sign = Vector512.ShiftLeft(u & Vector512.Create(0x8000u), 16);
        var mag = Vector512.ShiftLeft(u & Vector512.Create(0x7fffu), 13);
        var f = (mag.AsSingle() * Vector512.Create(Rescale)).AsUInt32();
        var infNan = Vector512.Equals(u & Vector512.Create(0x7c00u), Vector512.Create(0x7c00u));
        f = Vector512.ConditionalSelect(infNan, mag | Vector512.Create(0x7f800000u), f);
        return (f | sign).AsSingle();
    }
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Load256(nint row, int k)
    {
        var h = Vector128.Load((ushort*)row + k);
        Vector256<uint> u = Avx2.IsSupported ? Avx2.ConvertToVector256Int32(h).AsUInt32() : Vector256.Create(Vector128.WidenLower(h), Vector128.WidenUpper(h));
        var sign = Vector256.ShiftLeft(u & Vector256.Create(0x8000u), 16);
        var mag = Vector256.ShiftLeft(u & Vector256.Create(0x7fffu), 13);
        var f = (mag.AsSingle() * Vector256.Create(Rescale)).AsUInt32();
        var infNan = Vector256.Equals(u & Vector256.Create(0x7c00u), Vector256.Create(0x7c00u));
        f = Vector256.ConditionalSelect(infNan, mag | Vector256.Create(0x7f800000u), f);
        return (f | sign).AsSingle();
    }
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Load1(nint row, int k) => (float)((Half*)row)[k];
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Broadcast512(nint row, int k) => Vector512.Create(Load1(row, k));
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Broadcast256(nint row, int k) => Vector256.Create(Load1(row, k));
}

/// <summary>
/// Q8_0 rows: for each block of 32 weights an fp32 scale d then 32 int8 q; weight = d · q. (llama.cpp stores d as
/// fp16; .NET has no hardware fp16→fp32 conversion, so a software one per block would make the kernels
/// compute-bound — fp32 scales cost 4 % more bytes and nothing in time.) Vector loads start at a multiple of their
/// width, so they never straddle a block when K is a multiple of 32.
/// </summary>
public unsafe struct Q8Load : IWeightLoad
{
    public const int Block = 32;
    public const int BlockBytes = 4 + Block;
    private const int Q = 4;   // offset of the int8 values in a block


    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static byte* BlockAt(nint row, int k) => (byte*)row + k / Block * BlockBytes;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Scale(nint row, int k) => *(float*)BlockAt(row, k);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Load512(nint row, int k)
    {
        byte* b = BlockAt(row, k);
        var q = Vector128.Load((sbyte*)(b + Q + k % Block));
        Vector512<int> wide = Avx512F.IsSupported ? Avx512F.ConvertToVector512Int32(q)
            : Vector512.Create(Vector256.WidenLower(Vector256.WidenLower(q.ToVector256())), Vector256.WidenUpper(Vector256.WidenLower(q.ToVector256())));
        return Vector512.ConvertToSingle(wide) * *(float*)b;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Load256(nint row, int k)
    {
        byte* b = BlockAt(row, k);
        var q = Vector128.CreateScalar(*(long*)(b + Q + k % Block)).AsSByte();
        Vector256<int> wide = Avx2.IsSupported ? Avx2.ConvertToVector256Int32(q) : Vector256.Create(Vector128.WidenLower(Vector128.WidenLower(q)), Vector128.WidenUpper(Vector128.WidenLower(q)));
        return Vector256.ConvertToSingle(wide) * *(float*)b;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Load1(nint row, int k)
    {
        byte* b = BlockAt(row, k);
        return *(float*)b * ((sbyte*)(b + Q))[k % Block];
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Broadcast512(nint row, int k) => Vector512.Create(Load1(row, k));
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Broadcast256(nint row, int k) => Vector256.Create(Load1(row, k));

    /// <summary>Quantizes one row of K fp32 weights (K a multiple of 32) into <paramref name="dst"/> (K/32·36 bytes).</summary>
    public static void QuantizeRow(ReadOnlySpan<float> w, byte* dst)
    {
        if (w.Length % Block != 0) throw new ArgumentException($"Q8 needs rows that are a multiple of {Block} long, got {w.Length}");
        for (int b = 0; b < w.Length / Block; b++, dst += BlockBytes)
            *(float*)dst = QuantizeBlock(w.Slice(b * Block, Block), (sbyte*)(dst + Q));
    }

    /// <summary>The one rounding rule for weights and activations alike: 32 values → int8 with scale max|v|/127 (returned).</summary>
    public static float QuantizeBlock(ReadOnlySpan<float> v, sbyte* q)
    {
        float amax = 0;
        foreach (var x in v) amax = Math.Max(amax, Math.Abs(x));
        float d = amax / 127f, inv = d == 0 ? 0 : 1f / d;
        for (int i = 0; i < v.Length; i++) q[i] = (sbyte)Math.Clamp((int)MathF.Round(v[i] * inv), -127, 127);
        return d;
    }
}

public static unsafe class Widen
{
    /// <summary>n weights of <paramref name="type"/> at <paramref name="src"/> → fp32.</summary>
    public static void ToF32(WeightType type, nint src, float* dst, int n)
    {
        switch (type)
        {
            case WeightType.F32: new ReadOnlySpan<float>((void*)src, n).CopyTo(new Span<float>(dst, n)); break;
            case WeightType.BF16: Run<Bf16Load>(src, dst, n); break;
            case WeightType.F16: Run<F16Load>(src, dst, n); break;
            case WeightType.Q8: for (int k = 0; k < n; k++) dst[k] = Q8Load.Load1(src, k); break;
            default: throw new ArgumentOutOfRangeException(nameof(type));
        }
    }

    private static void Run<T>(nint src, float* dst, int n) where T : IWeightLoad
    {
        int k = 0;
        if (Vector512.IsHardwareAccelerated)
            for (; k + 16 <= n; k += 16) T.Load512(src, k).Store(dst + k);
        else if (Vector256.IsHardwareAccelerated)
            for (; k + 8 <= n; k += 8) T.Load256(src, k).Store(dst + k);
        for (; k < n; k++) dst[k] = T.Load1(src, k);
    }
}
