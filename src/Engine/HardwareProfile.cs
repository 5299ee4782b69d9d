using System.Text.Json;

namespace MiniLlm.Engine;

/// <summary>
/// A device's roofs: dense tensor throughput per precision, memory bandwidth and capacity. Figures are the
/// vendors' datasheet numbers (dense, no sparsity); the source of each is noted beside it.
/// </summary>
public sealed record HardwareProfile(string Name, string Description, double Bf16Tflops, double Fp8Tflops, double BandwidthTBps, double MemoryGB, string Source)
{
    /// <summary>Peak dense FLOP/s for weights of <paramref name="dtype"/> (int4 weights are widened to bf16 for the math).</summary>
    public double PeakFlops(string dtype) => dtype switch
    {
        "fp8" when Fp8Tflops > 0 => Fp8Tflops * 1e12,
        "fp8" => throw new ArgumentException($"{Name} has no fp8 tensor cores; use --dtype bf16 or int4", "dtype"),
        _ => Bf16Tflops * 1e12,
    };

    public double BandwidthBytes => BandwidthTBps * 1e12;

    public static IReadOnlyDictionary<string, HardwareProfile> BuiltIn { get; } = new Dictionary<string, HardwareProfile>(StringComparer.OrdinalIgnoreCase)
    {
        // NVIDIA H100 SXM5 datasheet: BF16 989.4 TFLOPS dense (1979 with sparsity), FP8 1979 dense, HBM3 3.35 TB/s, 80 GB.
        ["h100"] = new("h100", "NVIDIA H100 SXM 80GB", 989.4, 1978.9, 3.35, 80, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
        // NVIDIA H200 SXM datasheet: same compute as H100 SXM, HBM3e 4.8 TB/s, 141 GB.
        ["h200"] = new("h200", "NVIDIA H200 SXM 141GB", 989.4, 1978.9, 4.8, 141, "NVIDIA H200 Tensor Core GPU datasheet"),
        // NVIDIA A100 80GB SXM datasheet: BF16 312 TFLOPS dense, no FP8, HBM2e 2.039 TB/s.
        ["a100"] = new("a100", "NVIDIA A100 SXM 80GB", 312, 0, 2.039, 80, "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"),
        // AMD Instinct MI300X datasheet: BF16 1307.4 TFLOPS dense, FP8 2614.9 dense, HBM3 5.3 TB/s, 192 GB.
        ["mi300x"] = new("mi300x", "AMD Instinct MI300X 192GB", 1307.4, 2614.9, 5.3, 192, "AMD Instinct MI300X data sheet"),
        // NVIDIA Ada whitepaper (RTX 4090): FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS dense, FP8 330.3 dense, 1008 GB/s, 24 GB.
        ["rtx4090"] = new("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 165.2, 330.3, 1.008, 24, "NVIDIA Ada Lovelace architecture whitepaper, Appendix A"),
        // Apple M2 Max (38-core GPU): ~13.6 TFLOPS fp32 (no faster bf16 path assumed), 400 GB/s unified memory, up to 96 GB.
        ["m2max"] = new("m2max", "Apple M2 Max (38-core GPU)", 13.6, 0, 0.4, 96, "Apple M2 Max announcement (Jan 2023): 400 GB/s, 38-core GPU"),
    };

    /// <summary>A built-in name, or a JSON file with name, bf16_tflops, fp8_tflops, bandwidth_tbps, memory_gb.</summary>
    public static HardwareProfile Resolve(string nameOrFile)
    {
        if (BuiltIn.TryGetValue(nameOrFile, out var p)) return p;
        if (File.Exists(nameOrFile))
        {
            try
            {
                using var doc = JsonDocument.Parse(File.ReadAllBytes(nameOrFile));
                var o = doc.RootElement;
                double D(string k) => o.TryGetProperty(k, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble()
                    : throw new ArgumentException($"{nameOrFile}: needs a number '{k}'", "hardware");
                string name = o.TryGetProperty("name", out var n) ? n.GetString() ?? nameOrFile : Path.GetFileNameWithoutExtension(nameOrFile);
                return new HardwareProfile(name, name, D("bf16_tflops"), o.TryGetProperty("fp8_tflops", out var f8) ? f8.GetDouble() : 0,
                    D("bandwidth_tbps"), D("memory_gb"), nameOrFile);
            }
            catch (JsonException e) { throw new ArgumentException($"{nameOrFile}: not valid JSON ({e.Message})", "hardware"); }
        }
        throw new ArgumentException($"unknown hardware '{nameOrFile}' (built in: {string.Join(", ", BuiltIn.Keys)}; or a JSON file)", "hardware");
    }
}

/// <summary>Published model configurations for projections (Hugging Face config.json values).</summary>
public static class KnownConfigs
{
    private static Loader.LlamaConfig C(int d, int f, int layers, int heads, int kv, int vocab, int ctx, bool tied = false) => new()
    {
        HiddenSize = d, IntermediateSize = f, NumHiddenLayers = layers, NumAttentionHeads = heads, NumKeyValueHeads = kv,
        HeadDim = d / heads, VocabSize = vocab, MaxPositionEmbeddings = ctx, TieWordEmbeddings = tied,
    };

    public static IReadOnlyDictionary<string, Loader.LlamaConfig> All { get; } = new Dictionary<string, Loader.LlamaConfig>(StringComparer.OrdinalIgnoreCase)
    {
        ["llama2-7b"] = C(4096, 11008, 32, 32, 32, 32000, 4096),
        ["llama2-13b"] = C(5120, 13824, 40, 40, 40, 32000, 4096),
        ["llama2-70b"] = C(8192, 28672, 80, 64, 8, 32000, 4096),
        ["llama3-8b"] = C(4096, 14336, 32, 32, 8, 128256, 8192),
        ["llama3-70b"] = C(8192, 28672, 80, 64, 8, 128256, 8192),
        ["tinyllama-1.1b"] = C(2048, 5632, 22, 32, 4, 32000, 2048),
        ["stories110m"] = C(768, 2048, 12, 12, 12, 32000, 1024, tied: true),
    };

    public static Loader.LlamaConfig Get(string name) => All.TryGetValue(name, out var c)
        ? c
        : throw new ArgumentException($"unknown config '{name}' (known: {string.Join(", ", All.Keys)}; or --model PATH)", "config");
}
