using System.Text.Json;

namespace MiniLlm.Tests;

/// <summary>Shape of a random-weight test model.</summary>
public sealed record RandomModelSpec
{
    public int Hidden { get; init; } = 36;
    public int Intermediate { get; init; } = 67;
    public int Layers { get; init; } = 2;
    public int Heads { get; init; } = 6;
    public int KvHeads { get; init; } = 3;
    public int HeadDim { get; init; } = 10;
    public int Vocab { get; init; } = 97;
    public int Context { get; init; } = 64;
    public bool Tied { get; init; }
    public string DType { get; init; } = "F32";
    public double RopeTheta { get; init; } = 10000;
    /// <summary>(factor, low, high, original) for a llama3 rope_scaling block, or null.</summary>
    public (double, double, double, int)? Llama3Scaling { get; init; }
    public int Seed { get; init; } = 1234;
    public float Scale { get; init; } = 0.35f;
}

/// <summary>
/// Writes a seeded random-weight model in Hugging Face layout and keeps the weights (as stored, i.e. after dtype
/// rounding) for the naive reference.
/// </summary>
public sealed class RandomModel
{
    public RandomModelSpec Spec { get; }
    public string Dir { get; }
    public Dictionary<string, (long[] Shape, float[] Values)> Tensors { get; } = new();

    public RandomModel(RandomModelSpec spec, string dir)
    {
        Spec = spec;
        Dir = dir;
        var rng = new Random(spec.Seed);
        int d = spec.Hidden, f = spec.Intermediate, q = spec.Heads * spec.HeadDim, kv = spec.KvHeads * spec.HeadDim, V = spec.Vocab;
        void Add(string name, float scale, float offset, params long[] shape)
        {
            long n = shape.Aggregate(1L, (a, b) => a * b);
            var v = new float[n];
            for (long i = 0; i < n; i++)
                v[i] = TestSafetensors.RoundTo(offset + scale * (float)(rng.NextDouble() * 2 - 1), spec.DType);
            Tensors[name] = (shape, v);
        }
        float s = spec.Scale;
        Add("model.embed_tokens.weight", 1.0f, 0, V, d);
        for (int l = 0; l < spec.Layers; l++)
        {
            string p = $"model.layers.{l}.";
            Add(p + "input_layernorm.weight", 0.2f, 1, d);
            Add(p + "self_attn.q_proj.weight", s, 0, q, d);
            Add(p + "self_attn.k_proj.weight", s, 0, kv, d);
            Add(p + "self_attn.v_proj.weight", s, 0, kv, d);
            Add(p + "self_attn.o_proj.weight", s, 0, d, q);
            Add(p + "post_attention_layernorm.weight", 0.2f, 1, d);
            Add(p + "mlp.gate_proj.weight", s, 0, f, d);
            Add(p + "mlp.up_proj.weight", s, 0, f, d);
            Add(p + "mlp.down_proj.weight", s, 0, d, f);
        }
        Add("model.norm.weight", 0.2f, 1, d);
        if (!spec.Tied) Add("lm_head.weight", s, 0, V, d);

        Directory.CreateDirectory(dir);
        TestSafetensors.Write(Path.Combine(dir, "model.safetensors"),
            Tensors.Select(kv => TestSafetensors.Typed(kv.Key, kv.Value.Shape, kv.Value.Values, spec.DType)));
        File.WriteAllText(Path.Combine(dir, "config.json"), ConfigJson(spec));
    }

    public static string ConfigJson(RandomModelSpec spec)
    {
        var cfg = new Dictionary<string, object?>
        {
            ["architectures"] = new[] { "LlamaForCausalLM" },
            ["model_type"] = "llama",
            ["hidden_size"] = spec.Hidden,
            ["intermediate_size"] = spec.Intermediate,
            ["num_hidden_layers"] = spec.Layers,
            ["num_attention_heads"] = spec.Heads,
            ["num_key_value_heads"] = spec.KvHeads,
            ["head_dim"] = spec.HeadDim,
            ["vocab_size"] = spec.Vocab,
            ["max_position_embeddings"] = spec.Context,
            ["rms_norm_eps"] = 1e-5,
            ["rope_theta"] = spec.RopeTheta,
            ["tie_word_embeddings"] = spec.Tied,
            ["hidden_act"] = "silu",
            ["bos_token_id"] = 1,
            ["eos_token_id"] = 2,
            ["torch_dtype"] = spec.DType switch { "F32" => "float32", "BF16" => "bfloat16", _ => "float16" },
        };
        if (spec.Llama3Scaling is var (factor, low, high, orig))
            cfg["rope_scaling"] = new Dictionary<string, object>
            {
                ["rope_type"] = "llama3", ["factor"] = factor, ["low_freq_factor"] = low,
                ["high_freq_factor"] = high, ["original_max_position_embeddings"] = orig,
            };
        return JsonSerializer.Serialize(cfg, new JsonSerializerOptions { WriteIndented = true });
    }
}
