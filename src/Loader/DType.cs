namespace MiniLlm.Loader;

/// <summary>Element types MiniLlm keeps weights in. Activations are always fp32.</summary>
public enum DType
{
    F32,
    F16,
    BF16,
    /// <summary>Raw bytes: only accepted as the container of MiniLlm's own Q8_0 export (metadata minillm_quant = q8_0).</summary>
    U8,
}

public static class DTypes
{
    public static int SizeOf(DType t) => t switch
    {
        DType.F32 => 4,
        DType.F16 => 2,
        DType.BF16 => 2,
        DType.U8 => 1,
        _ => throw new ArgumentOutOfRangeException(nameof(t)),
    };

    /// <summary>The safetensors spelling of the type.</summary>
    public static string Name(DType t) => t switch
    {
        DType.F32 => "F32",
        DType.F16 => "F16",
        DType.BF16 => "BF16",
        DType.U8 => "U8",
        _ => throw new ArgumentOutOfRangeException(nameof(t)),
    };

    /// <summary>Every dtype the safetensors format defines; those we cannot compute with are known but rejected.</summary>
    internal static readonly HashSet<string> KnownButUnsupported =
        ["F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"];

    public static bool TryParse(string s, out DType t)
    {
        switch (s)
        {
            case "F32": t = DType.F32; return true;
            case "F16": t = DType.F16; return true;
            case "BF16": t = DType.BF16; return true;
            case "U8": t = DType.U8; return true;
            default: t = default; return false;
        }
    }

    /// <summary>Parses a --dtype / torch_dtype spelling (f32, float32, bf16, bfloat16, f16, float16).</summary>
    public static DType ParseUser(string s) => s.ToLowerInvariant() switch
    {
        "f32" or "fp32" or "float32" or "float" => DType.F32,
        "bf16" or "bfloat16" => DType.BF16,
        "f16" or "fp16" or "float16" or "half" => DType.F16,
        _ => throw new ArgumentException($"unknown dtype '{s}' (expected f32, bf16 or f16)"),
    };
}
