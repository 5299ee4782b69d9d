using System.CommandLine;

namespace MiniLlm.Cli;

/// <summary>Options shared by several commands.</summary>
public static class CommonOptions
{
    public static Option<string?> Model() => new("--model", "-m")
    {
        Description = "Model directory, or a name looked up under $MINILLM_MODELS, models/ and ../shared/models/ (default: tiny-kjv)",
    };

    public static Option<int> Threads() => new("--threads", "-t")
    {
        Description = "Worker threads (0 = one per core)",
        DefaultValueFactory = _ => 0,
    };

    public static Option<string> Weights() => new Option<string>("--weights")
    {
        Description = "Hold the weights as stored, or quantize them to Q8_0 at load (blocks of 32 int8 with one fp32 scale)",
        DefaultValueFactory = _ => "stored",
    }.AcceptOnlyFromAmong("stored", "q8");

    public static Option<string> Q8Activations() => new Option<string>("--q8-activations")
    {
        Description = "With Q8 weights at batch 1: fp32 activations (int8 widened in registers) or int8 activations per block of 32 with AVX-VNNI dot products",
        DefaultValueFactory = _ => "fp32",
    }.AcceptOnlyFromAmong("fp32", "int8");

    public static Option<bool> Mmap() => new("--mmap")
    {
        Description = "Read the weights in place from the memory-mapped checkpoint (4 KiB pages) instead of copying them onto 2 MiB pages at load (less memory, slower decode)",
    };

    public static Option<string> KvDtype() => new Option<string>("--kv-dtype")
    {
        Description = "KV cache element type: f32, or bf16 (half the memory and half the attention bytes, keys and values rounded to nearest even)",
        DefaultValueFactory = _ => "f32",
    }.AcceptOnlyFromAmong("f32", "bf16");

    public static MiniLlm.Kernels.KvType KvType(string s) => s == "bf16" ? MiniLlm.Kernels.KvType.BF16 : MiniLlm.Kernels.KvType.F32;

    /// <summary>The <c>--kv-dtype</c> value naming a KV type, as the reports print it.</summary>
    public static string KvName(MiniLlm.Kernels.KvType kv) => kv == MiniLlm.Kernels.KvType.BF16 ? "bf16" : "f32";

    public static MiniLlm.Engine.WeightFormat Format(string s) => s == "q8" ? MiniLlm.Engine.WeightFormat.Q8 : MiniLlm.Engine.WeightFormat.Stored;

    public static Option<string> Output() => new Option<string>("--output", "-o")
    {
        Description = "Output format",
        DefaultValueFactory = _ => "text",
    }.AcceptOnlyFromAmong("text", "json");
}
