using System.Runtime.Intrinsics;

namespace MiniLlm.Kernels;

/// <summary>Llama 3 RoPE frequency scaling parameters (HF rope_scaling with rope_type "llama3").</summary>
public readonly record struct Llama3Scaling(double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositions);

/// <summary>
/// Rotary position embedding, rotate-half convention (HF Llama): for i &lt; hd/2,
/// x'[i] = x[i]·cos − x[i+hd/2]·sin and x'[i+hd/2] = x[i+hd/2]·cos + x[i]·sin, with angle = pos·inv_freq[i].
/// cos/sin are tabulated once for every position as HF computes them (fp32 inverse frequencies and angles).
/// </summary>
public sealed unsafe class RopeTable
{
    private readonly float[] _cos, _sin;   // [maxPositions × hd/2]
    public int HeadDim { get; }
    public int Half => HeadDim / 2;
    public int MaxPositions { get; }
    public float[] InverseFrequencies { get; }

    public RopeTable(int headDim, int maxPositions, double theta, Llama3Scaling? scaling)
    {
        if (headDim % 2 != 0) throw new ArgumentException("head_dim must be even", nameof(headDim));
        HeadDim = headDim;
        MaxPositions = maxPositions;
        InverseFrequencies = InverseFrequenciesFor(headDim, theta, scaling);
        int half = headDim / 2;
        _cos = new float[(long)maxPositions * half];
        _sin = new float[(long)maxPositions * half];
        for (int p = 0; p < maxPositions; p++)
            for (int i = 0; i < half; i++)
            {
                float angle = (float)p * InverseFrequencies[i];   // fp32 product, as torch does
                _cos[(long)p * half + i] = (float)Math.Cos(angle);
                _sin[(long)p * half + i] = (float)Math.Sin(angle);
            }
    }

    /// <summary>HF: inv_freq = 1 / theta^(2i/hd), then llama3 smoothing between the low and high frequency bands.</summary>
    public static float[] InverseFrequenciesFor(int headDim, double theta, Llama3Scaling? scaling)
    {
        int half = headDim / 2;
        var inv = new float[half];
        for (int i = 0; i < half; i++)
            inv[i] = (float)(1.0 / Math.Pow(theta, (float)(2 * i) / headDim));
        if (scaling is not { } s) return inv;
        double lowWavelen = s.OriginalMaxPositions / s.LowFreqFactor;
        double highWavelen = s.OriginalMaxPositions / s.HighFreqFactor;
        for (int i = 0; i < half; i++)
        {
            double f = inv[i];
            double wavelen = 2 * Math.PI / f;
            if (wavelen > lowWavelen) f /= s.Factor;                       // long wavelengths: fully scaled
            else if (wavelen >= highWavelen)                               // the band between: interpolate
            {
                double smooth = (s.OriginalMaxPositions / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
                f = (1 - smooth) * f / s.Factor + smooth * f;
            }
            inv[i] = (float)f;
        }
        return inv;
    }

    /// <summary>Rotates <paramref name="heads"/> heads of one token at position <paramref name="pos"/> in place. x: [heads × hd].</summary>
    public void Apply(float* x, int heads, int pos)
    {
        if ((uint)pos >= (uint)MaxPositions) throw new ArgumentOutOfRangeException(nameof(pos), $"position {pos} is beyond the RoPE table ({MaxPositions})");
        int half = Half;
        fixed (float* cp = &_cos[(long)pos * half], sp = &_sin[(long)pos * half])
        {
            for (int h = 0; h < heads; h++)
            {
                float* a = x + h * HeadDim, b = a + half;
                int i = 0;
                // Whole vectors where the half fits them (hd 32 → one Vector512 per head). Products and differences
                // are separate instructions as in the scalar loop (no FMA), so both give the same bits.
                if (Vector512.IsHardwareAccelerated && SimdPolicy.Current == SimdPolicy.Isa.V512)
                    for (; i + 16 <= half; i += 16)
                    {
                        var x0 = Vector512.Load(a + i); var x1 = Vector512.Load(b + i);
                        var c = Vector512.Load(cp + i); var s = Vector512.Load(sp + i);
                        (x0 * c - x1 * s).Store(a + i);
                        (x1 * c + x0 * s).Store(b + i);
                    }
                if (Vector256.IsHardwareAccelerated && SimdPolicy.Current != SimdPolicy.Isa.Scalar)
                    for (; i + 8 <= half; i += 8)
                    {
                        var x0 = Vector256.Load(a + i); var x1 = Vector256.Load(b + i);
                        var c = Vector256.Load(cp + i); var s = Vector256.Load(sp + i);
                        (x0 * c - x1 * s).Store(a + i);
                        (x1 * c + x0 * s).Store(b + i);
                    }
                for (; i < half; i++)
                {
                    float x0 = a[i], x1 = b[i], c = cp[i], s = sp[i];
                    a[i] = x0 * c - x1 * s;
                    b[i] = x1 * c + x0 * s;
                }
            }
        }
    }
}
