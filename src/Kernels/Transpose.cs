using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MiniLlm.Kernels;

/// <summary>Register transposes for packing GEMM operands (AVX-512).</summary>
internal static unsafe class Transpose
{
    /// <summary>
    /// dst[k·ldd + j] = row j's element k for a 16 × 16 block, rows 0–7 at src + j·ld and rows 8–15 at src8 + (j−8)·ld
    /// (two pointers so two separate 8-row tiles can be transposed as one block). In registers: 16 loads, 64 shuffles
    /// and 16 stores, where AVX2 gathers cost ~25 cycles per 8 elements on this CPU (packing a 16 × 768 X took as long
    /// as half of a 16-row GEMM's arithmetic).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Block16(float* src, float* src8, int ld, float* dst, int ldd)
    {
        // Rows r0..r15 → pairs interleaved (32-bit), then 64-bit, then 128-bit lanes twice.
        var r0 = Vector512.Load(src); var r1 = Vector512.Load(src + ld); var r2 = Vector512.Load(src + 2L * ld); var r3 = Vector512.Load(src + 3L * ld);
        var r4 = Vector512.Load(src + 4L * ld); var r5 = Vector512.Load(src + 5L * ld); var r6 = Vector512.Load(src + 6L * ld); var r7 = Vector512.Load(src + 7L * ld);
        var r8 = Vector512.Load(src8); var r9 = Vector512.Load(src8 + ld); var r10 = Vector512.Load(src8 + 2L * ld); var r11 = Vector512.Load(src8 + 3L * ld);
        var r12 = Vector512.Load(src8 + 4L * ld); var r13 = Vector512.Load(src8 + 5L * ld); var r14 = Vector512.Load(src8 + 6L * ld); var r15 = Vector512.Load(src8 + 7L * ld);
        // 32-bit: t0 = r0[0] r1[0] r0[1] r1[1] | per 128-bit lane
        var t0 = Avx512F.UnpackLow(r0, r1); var t1 = Avx512F.UnpackHigh(r0, r1); var t2 = Avx512F.UnpackLow(r2, r3); var t3 = Avx512F.UnpackHigh(r2, r3);
        var t4 = Avx512F.UnpackLow(r4, r5); var t5 = Avx512F.UnpackHigh(r4, r5); var t6 = Avx512F.UnpackLow(r6, r7); var t7 = Avx512F.UnpackHigh(r6, r7);
        var t8 = Avx512F.UnpackLow(r8, r9); var t9 = Avx512F.UnpackHigh(r8, r9); var t10 = Avx512F.UnpackLow(r10, r11); var t11 = Avx512F.UnpackHigh(r10, r11);
        var t12 = Avx512F.UnpackLow(r12, r13); var t13 = Avx512F.UnpackHigh(r12, r13); var t14 = Avx512F.UnpackLow(r14, r15); var t15 = Avx512F.UnpackHigh(r14, r15);
        // 64-bit: u0 = r0..r3 at column 4q+0 per lane q, u1 = column 4q+1, u2 = 4q+2, u3 = 4q+3
        var u0 = Lo64(t0, t2); var u1 = Hi64(t0, t2); var u2 = Lo64(t1, t3); var u3 = Hi64(t1, t3);
        var u4 = Lo64(t4, t6); var u5 = Hi64(t4, t6); var u6 = Lo64(t5, t7); var u7 = Hi64(t5, t7);
        var u8 = Lo64(t8, t10); var u9 = Hi64(t8, t10); var u10 = Lo64(t9, t11); var u11 = Hi64(t9, t11);
        var u12 = Lo64(t12, t14); var u13 = Hi64(t12, t14); var u14 = Lo64(t13, t15); var u15 = Hi64(t13, t15);
        // 128-bit lanes: v = [rows 0–3 | rows 4–7] of columns (lane pair), then the final rows 0–15 of one column.
        var v0 = Avx512F.Shuffle4x128(u0, u4, 0b10_00_10_00); var v1 = Avx512F.Shuffle4x128(u1, u5, 0b10_00_10_00);
        var v2 = Avx512F.Shuffle4x128(u2, u6, 0b10_00_10_00); var v3 = Avx512F.Shuffle4x128(u3, u7, 0b10_00_10_00);
        var v4 = Avx512F.Shuffle4x128(u0, u4, 0b11_01_11_01); var v5 = Avx512F.Shuffle4x128(u1, u5, 0b11_01_11_01);
        var v6 = Avx512F.Shuffle4x128(u2, u6, 0b11_01_11_01); var v7 = Avx512F.Shuffle4x128(u3, u7, 0b11_01_11_01);
        var v8 = Avx512F.Shuffle4x128(u8, u12, 0b10_00_10_00); var v9 = Avx512F.Shuffle4x128(u9, u13, 0b10_00_10_00);
        var v10 = Avx512F.Shuffle4x128(u10, u14, 0b10_00_10_00); var v11 = Avx512F.Shuffle4x128(u11, u15, 0b10_00_10_00);
        var v12 = Avx512F.Shuffle4x128(u8, u12, 0b11_01_11_01); var v13 = Avx512F.Shuffle4x128(u9, u13, 0b11_01_11_01);
        var v14 = Avx512F.Shuffle4x128(u10, u14, 0b11_01_11_01); var v15 = Avx512F.Shuffle4x128(u11, u15, 0b11_01_11_01);
        // v0 = lanes [r0-3 c0, r0-3 c8, r4-7 c0, r4-7 c8]; combine with v8 (rows 8–15) the same way.
        Avx512F.Shuffle4x128(v0, v8, 0b10_00_10_00).Store(dst);
        Avx512F.Shuffle4x128(v1, v9, 0b10_00_10_00).Store(dst + ldd);
        Avx512F.Shuffle4x128(v2, v10, 0b10_00_10_00).Store(dst + 2L * ldd);
        Avx512F.Shuffle4x128(v3, v11, 0b10_00_10_00).Store(dst + 3L * ldd);
        Avx512F.Shuffle4x128(v4, v12, 0b10_00_10_00).Store(dst + 4L * ldd);
        Avx512F.Shuffle4x128(v5, v13, 0b10_00_10_00).Store(dst + 5L * ldd);
        Avx512F.Shuffle4x128(v6, v14, 0b10_00_10_00).Store(dst + 6L * ldd);
        Avx512F.Shuffle4x128(v7, v15, 0b10_00_10_00).Store(dst + 7L * ldd);
        Avx512F.Shuffle4x128(v0, v8, 0b11_01_11_01).Store(dst + 8L * ldd);
        Avx512F.Shuffle4x128(v1, v9, 0b11_01_11_01).Store(dst + 9L * ldd);
        Avx512F.Shuffle4x128(v2, v10, 0b11_01_11_01).Store(dst + 10L * ldd);
        Avx512F.Shuffle4x128(v3, v11, 0b11_01_11_01).Store(dst + 11L * ldd);
        Avx512F.Shuffle4x128(v4, v12, 0b11_01_11_01).Store(dst + 12L * ldd);
        Avx512F.Shuffle4x128(v5, v13, 0b11_01_11_01).Store(dst + 13L * ldd);
        Avx512F.Shuffle4x128(v6, v14, 0b11_01_11_01).Store(dst + 14L * ldd);
        Avx512F.Shuffle4x128(v7, v15, 0b11_01_11_01).Store(dst + 15L * ldd);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Lo64(Vector512<float> a, Vector512<float> b) => Avx512F.UnpackLow(a.AsDouble(), b.AsDouble()).AsSingle();
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Hi64(Vector512<float> a, Vector512<float> b) => Avx512F.UnpackHigh(a.AsDouble(), b.AsDouble()).AsSingle();

}
