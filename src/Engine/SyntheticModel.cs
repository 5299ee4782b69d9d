using System.Text.Json;
using MiniLlm.Loader;

namespace MiniLlm.Engine;

/// <summary>The dimensions of a Llama, for synthetic models and cost projections.</summary>
public sealed record ModelShape(string Name, int Hidden, int Intermediate, int Layers, int Heads, int KvHeads, int Vocab,
    int Context, bool Tied, double RopeTheta = 10000)
{
    public int HeadDim => Hidden / Heads;

    /// <summary>Shapes users know. stories110m: llama2.c's stories110M. tinyllama-4l: TinyLlama-1.1B's dimensions, 4 of its 22 layers.</summary>
    public static IReadOnlyDictionary<string, ModelShape> Known { get; } = new Dictionary<string, ModelShape>
    {
        ["stories15m"] = new("stories15m", 288, 768, 6, 6, 6, 32000, 256, true),
        ["stories110m"] = new("stories110m", 768, 2048, 12, 12, 12, 32000, 1024, true),
        ["tinyllama-4l"] = new("tinyllama-4l", 2048, 5632, 4, 32, 4, 32000, 2048, false),
        ["tiny-kjv"] = new("tiny-kjv", 256, 768, 6, 8, 4, 4096, 512, true),
    };

    public static ModelShape Get(string name) => Known.TryGetValue(name, out var s)
        ? s
        : throw new ArgumentException($"unknown shape '{name}' (known: {string.Join(", ", Known.Keys)}; or give --hidden/--layers/… for a custom one)", "shape");
}

/// <summary>
/// Writes a seeded random-weight Llama in Hugging Face layout (config.json, model.safetensors, tokenizer.model).
/// The weights are random but well-scaled (std 0.02, norms 1), so the forward pass behaves like a real model's
/// numerically while the benchmarks see real sizes.
/// </summary>
public static class SyntheticModel
{
    public static void Write(ModelShape s, DType dtype, string dir, ulong seed = 0)
    {
        if (s.Hidden % s.Heads != 0) throw new ArgumentException($"hidden {s.Hidden} is not divisible by heads {s.Heads}", "hidden");
        if (s.Heads % s.KvHeads != 0) throw new ArgumentException($"heads {s.Heads} is not a multiple of kv-heads {s.KvHeads}", "kv-heads");
        Directory.CreateDirectory(dir);
        var tensors = new List<SafetensorsWriter.TensorSpec>();
        void Add(string name, params long[] shape) => tensors.Add(new(name, dtype, shape));
        int d = s.Hidden, f = s.Intermediate, hd = s.HeadDim;
        Add("model.embed_tokens.weight", s.Vocab, d);
        for (int l = 0; l < s.Layers; l++)
        {
            string p = $"model.layers.{l}.";
            Add(p + "input_layernorm.weight", d);
            Add(p + "self_attn.q_proj.weight", s.Heads * hd, d);
            Add(p + "self_attn.k_proj.weight", s.KvHeads * hd, d);
            Add(p + "self_attn.v_proj.weight", s.KvHeads * hd, d);
            Add(p + "self_attn.o_proj.weight", d, s.Heads * hd);
            Add(p + "post_attention_layernorm.weight", d);
            Add(p + "mlp.gate_proj.weight", f, d);
            Add(p + "mlp.up_proj.weight", f, d);
            Add(p + "mlp.down_proj.weight", d, f);
        }
        Add("model.norm.weight", d);
        if (!s.Tied) Add("lm_head.weight", s.Vocab, d);

        var rng = new SplitMix64(seed);
        var values = new float[1 << 16];
        var bytes = new byte[values.Length * 4];
        SafetensorsWriter.Write(Path.Combine(dir, Checkpoint.SingleFile), tensors, (t, stream) =>
        {
            bool norm = t.Name.EndsWith("norm.weight", StringComparison.Ordinal);
            long n = t.Shape.Aggregate(1L, (a, b) => a * b);
            int es = DTypes.SizeOf(t.DType);
            for (long i = 0; i < n; i += values.Length)
            {
                int len = (int)Math.Min(values.Length, n - i);
                for (int k = 0; k < len; k++) values[k] = norm ? 1f : rng.NextGaussian() * 0.02f;
                SafetensorsWriter.Encode(values.AsSpan(0, len), t.DType, bytes);
                stream.Write(bytes, 0, len * es);
            }
        }, new Dictionary<string, string> { ["format"] = "pt", ["minillm_synth"] = $"{s.Name} seed={seed}" });

        File.WriteAllText(Path.Combine(dir, "config.json"), ConfigJson(s, dtype));
        File.WriteAllText(Path.Combine(dir, "generation_config.json"), "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n");
        if (TokenizerFor(s.Vocab) is { } tok) File.Copy(tok, Path.Combine(dir, "tokenizer.model"), overwrite: true);
    }

    /// <summary>The shared tokenizer whose vocabulary matches: Llama 2's for 32000, tiny-kjv's for 4096.</summary>
    public static string? TokenizerFor(int vocab) => vocab switch
    {
        32000 => ModelLocator.FindShared(Path.Combine("tokenizers", "llama2", "tokenizer.model")),
        4096 => ModelLocator.FindShared(Path.Combine("models", "tiny-kjv", "tokenizer.model")),
        _ => null,
    };

    public static string ConfigJson(ModelShape s, DType dtype) => JsonSerializer.Serialize(new Dictionary<string, object>
    {
        ["architectures"] = new[] { "LlamaForCausalLM" },
        ["model_type"] = "llama",
        ["hidden_size"] = s.Hidden,
        ["intermediate_size"] = s.Intermediate,
        ["num_hidden_layers"] = s.Layers,
        ["num_attention_heads"] = s.Heads,
        ["num_key_value_heads"] = s.KvHeads,
        ["head_dim"] = s.HeadDim,
        ["vocab_size"] = s.Vocab,
        ["max_position_embeddings"] = s.Context,
        ["rms_norm_eps"] = 1e-5,
        ["rope_theta"] = s.RopeTheta,
        ["tie_word_embeddings"] = s.Tied,
        ["hidden_act"] = "silu",
        ["bos_token_id"] = 1,
        ["eos_token_id"] = 2,
        ["torch_dtype"] = dtype switch { DType.F32 => "float32", DType.BF16 => "bfloat16", _ => "float16" },
    }, new JsonSerializerOptions { WriteIndented = true });

    /// <summary>A tiny, fast, seeded generator (SplitMix64) with Box–Muller normals.</summary>
    private sealed class SplitMix64(ulong seed)
    {
        private ulong _s = seed;
        private float? _spare;

        private ulong Next()
        {
            ulong z = _s += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }

        private double NextDouble() => (Next() >> 11) * (1.0 / (1UL << 53));

        public float NextGaussian()
        {
            if (_spare is { } s) { _spare = null; return s; }
            double u1 = 1 - NextDouble(), u2 = NextDouble();
            double r = Math.Sqrt(-2 * Math.Log(u1));
            _spare = (float)(r * Math.Sin(2 * Math.PI * u2));
            return (float)(r * Math.Cos(2 * Math.PI * u2));
        }
    }
}
