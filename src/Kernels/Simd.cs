using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace MiniLlm.Kernels;

/// <summary>
/// One vector width as a type, so each kernel driver is written once and the JIT specialises it per width.
/// </summary>
public unsafe interface ISimd<TV> where TV : struct
{
    static abstract int Width { get; }
    static abstract TV Zero { get; }
    static abstract TV Load(float* p);
    static abstract TV LoadW<TL>(nint row, int k) where TL : IWeightLoad;
    static abstract TV BroadcastW<TL>(nint row, int k) where TL : IWeightLoad;
    /// <summary>a·b + acc, fused.</summary>
    static abstract TV Fma(TV a, TV b, TV acc);
    static abstract float Sum(TV v);
    static abstract TV Add(TV a, TV b);
    static abstract TV Broadcast(float v);
    static abstract void Store(TV v, float* p);
}

public unsafe struct Simd512 : ISimd<Vector512<float>>
{
    public static int Width => 16;
    public static Vector512<float> Zero => Vector512<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Load(float* p) => Vector512.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> LoadW<TL>(nint row, int k) where TL : IWeightLoad => TL.Load512(row, k);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> BroadcastW<TL>(nint row, int k) where TL : IWeightLoad => TL.Broadcast512(row, k);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Fma(Vector512<float> a, Vector512<float> b, Vector512<float> acc) => Vector512.FusedMultiplyAdd(a, b, acc);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sum(Vector512<float> v) => Vector512.Sum(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Add(Vector512<float> a, Vector512<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Broadcast(float v) => Vector512.Create(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(Vector512<float> v, float* p) => v.Store(p);
}

public unsafe struct Simd256 : ISimd<Vector256<float>>
{
    public static int Width => 8;
    public static Vector256<float> Zero => Vector256<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Load(float* p) => Vector256.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> LoadW<TL>(nint row, int k) where TL : IWeightLoad => TL.Load256(row, k);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> BroadcastW<TL>(nint row, int k) where TL : IWeightLoad => TL.Broadcast256(row, k);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> acc) => Vector256.FusedMultiplyAdd(a, b, acc);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sum(Vector256<float> v) => Vector256.Sum(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Add(Vector256<float> a, Vector256<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Broadcast(float v) => Vector256.Create(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(Vector256<float> v, float* p) => v.Store(p);
}

/// <summary>The one place that decides which vector width kernels use.</summary>
public static class SimdPolicy
{
    public enum Isa { Scalar, V256, V512 }

    /// <summary>Widest width this CPU accelerates.</summary>
    public static Isa Best => Vector512.IsHardwareAccelerated ? Isa.V512 : Vector256.IsHardwareAccelerated ? Isa.V256 : Isa.Scalar;

    /// <summary>What kernels use; tests narrow it to exercise the other paths. Never wider than <see cref="Best"/>.</summary>
    public static Isa Current { get; private set; } = Best;

    public static void Force(Isa isa) => Current = isa > Best ? Best : isa;
    public static void Reset() => Current = Best;
}
