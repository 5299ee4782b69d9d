using System.Text.Json;

namespace MiniLlm.Loader;

/// <summary>Llama 3 style RoPE frequency scaling (rope_scaling.rope_type == "llama3").</summary>
public sealed record Llama3RopeScaling(double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositionEmbeddings);

/// <summary>The fields of a Hugging Face <c>LlamaConfig</c> that the forward pass needs, validated.</summary>
public sealed record LlamaConfig
{
    public required int HiddenSize { get; init; }           // d
    public required int IntermediateSize { get; init; }     // f
    public required int NumHiddenLayers { get; init; }      // L
    public required int NumAttentionHeads { get; init; }    // h
    public required int NumKeyValueHeads { get; init; }     // g
    public required int HeadDim { get; init; }              // hd
    public required int VocabSize { get; init; }            // V
    public required int MaxPositionEmbeddings { get; init; }
    public double RmsNormEps { get; init; } = 1e-6;
    public double RopeTheta { get; init; } = 10000.0;
    public Llama3RopeScaling? RopeScaling { get; init; }
    public bool TieWordEmbeddings { get; init; }
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];
    public string? TorchDtype { get; init; }

    public int QDim => NumAttentionHeads * HeadDim;        // h·hd
    public int KvDim => NumKeyValueHeads * HeadDim;        // g·hd

    public static LlamaConfig Load(string path)
    {
        if (!File.Exists(path)) throw new ModelFormatException($"{path}: config.json not found");
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
            return Parse(doc.RootElement, path);
        }
        catch (JsonException e)
        {
            throw new ModelFormatException($"{path}: not valid JSON ({e.Message})");
        }
    }

    public static LlamaConfig Parse(JsonElement root, string path)
    {
        if (root.ValueKind != JsonValueKind.Object) throw new ModelFormatException($"{path}: must be a JSON object");

        if (root.TryGetProperty("model_type", out var mt) && mt.ValueKind == JsonValueKind.String && mt.GetString() != "llama")
            throw new ModelFormatException($"{path}: model_type '{mt.GetString()}' is not supported (MiniLlm runs Llama-architecture models)");
        if (root.TryGetProperty("hidden_act", out var act) && act.ValueKind == JsonValueKind.String && act.GetString() != "silu")
            throw new ModelFormatException($"{path}: hidden_act '{act.GetString()}' is not supported (only silu, i.e. SwiGLU)");
        foreach (var biasField in new[] { "attention_bias", "mlp_bias" })
            if (root.TryGetProperty(biasField, out var b) && b.ValueKind == JsonValueKind.True)
                throw new ModelFormatException($"{path}: {biasField}=true is not supported (Llama has no biases)");

        int hidden = RequiredInt(root, "hidden_size", path);
        int heads = RequiredInt(root, "num_attention_heads", path);
        int kvHeads = OptionalInt(root, "num_key_value_heads", path) ?? heads;
        int headDim = OptionalInt(root, "head_dim", path) ?? (hidden % heads == 0 ? hidden / heads
            : throw new ModelFormatException($"{path}: hidden_size {hidden} is not divisible by num_attention_heads {heads} and head_dim is not given"));
        var cfg = new LlamaConfig
        {
            HiddenSize = hidden,
            IntermediateSize = RequiredInt(root, "intermediate_size", path),
            NumHiddenLayers = RequiredInt(root, "num_hidden_layers", path),
            NumAttentionHeads = heads,
            NumKeyValueHeads = kvHeads,
            HeadDim = headDim,
            VocabSize = RequiredInt(root, "vocab_size", path),
            MaxPositionEmbeddings = RequiredInt(root, "max_position_embeddings", path),
            RmsNormEps = OptionalDouble(root, "rms_norm_eps", path) ?? 1e-6,
            RopeTheta = OptionalDouble(root, "rope_theta", path) ?? 10000.0,
            RopeScaling = ParseRopeScaling(root, path),
            TieWordEmbeddings = OptionalBool(root, "tie_word_embeddings", path) ?? false,
            BosTokenId = OptionalInt(root, "bos_token_id", path),
            EosTokenIds = ParseIds(root, "eos_token_id", path),
            TorchDtype = root.TryGetProperty("torch_dtype", out var td) && td.ValueKind == JsonValueKind.String ? td.GetString() : null,
        };
        cfg.Validate(path);
        return cfg;
    }

    private void Validate(string path)
    {
        void Positive(int v, string name)
        {
            if (v <= 0) throw new ModelFormatException($"{path}: {name} must be positive, got {v}");
        }
        Positive(HiddenSize, "hidden_size");
        Positive(IntermediateSize, "intermediate_size");
        Positive(NumHiddenLayers, "num_hidden_layers");
        Positive(NumAttentionHeads, "num_attention_heads");
        Positive(NumKeyValueHeads, "num_key_value_heads");
        Positive(HeadDim, "head_dim");
        Positive(VocabSize, "vocab_size");
        Positive(MaxPositionEmbeddings, "max_position_embeddings");
        if (NumAttentionHeads % NumKeyValueHeads != 0)
            throw new ModelFormatException($"{path}: num_attention_heads {NumAttentionHeads} is not a multiple of num_key_value_heads {NumKeyValueHeads}");
        if (HeadDim % 2 != 0) throw new ModelFormatException($"{path}: head_dim {HeadDim} must be even for rotary embeddings");
        if (!(RmsNormEps > 0)) throw new ModelFormatException($"{path}: rms_norm_eps must be positive");
        if (!(RopeTheta > 0)) throw new ModelFormatException($"{path}: rope_theta must be positive");
        if (BosTokenId is { } bos && (bos < 0 || bos >= VocabSize))
            throw new ModelFormatException($"{path}: bos_token_id {bos} is outside the vocabulary (size {VocabSize})");
        foreach (var e in EosTokenIds)
            if (e < 0 || e >= VocabSize) throw new ModelFormatException($"{path}: eos_token_id {e} is outside the vocabulary (size {VocabSize})");
    }

    private static Llama3RopeScaling? ParseRopeScaling(JsonElement root, string path)
    {
        if (!root.TryGetProperty("rope_scaling", out var rs) || rs.ValueKind == JsonValueKind.Null) return null;
        if (rs.ValueKind != JsonValueKind.Object) throw new ModelFormatException($"{path}: rope_scaling must be an object or null");
        string? type = null;
        if (rs.TryGetProperty("rope_type", out var t1) && t1.ValueKind == JsonValueKind.String) type = t1.GetString();
        else if (rs.TryGetProperty("type", out var t2) && t2.ValueKind == JsonValueKind.String) type = t2.GetString();
        if (type == "default") return null;
        if (type != "llama3")
            throw new ModelFormatException($"{path}: rope_scaling type '{type ?? "(none)"}' is not supported (only 'llama3')");
        string where = path + " rope_scaling";
        var s = new Llama3RopeScaling(
            RequiredDouble(rs, "factor", where),
            RequiredDouble(rs, "low_freq_factor", where),
            RequiredDouble(rs, "high_freq_factor", where),
            RequiredInt(rs, "original_max_position_embeddings", where));
        if (s.Factor <= 0 || s.LowFreqFactor <= 0 || s.HighFreqFactor <= s.LowFreqFactor || s.OriginalMaxPositionEmbeddings <= 0)
            throw new ModelFormatException($"{where}: needs factor > 0 and high_freq_factor > low_freq_factor > 0");
        return s;
    }

    private static IReadOnlyList<int> ParseIds(JsonElement root, string name, string path)
    {
        if (!root.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return [];
        if (v.ValueKind == JsonValueKind.Number) return [RequiredInt(root, name, path)];
        if (v.ValueKind == JsonValueKind.Array)
        {
            var ids = new List<int>();
            foreach (var e in v.EnumerateArray())
            {
                if (e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out int id))
                    throw new ModelFormatException($"{path}: {name} must be an integer or a list of integers");
                ids.Add(id);
            }
            return ids;
        }
        throw new ModelFormatException($"{path}: {name} must be an integer or a list of integers");
    }

    private static int RequiredInt(JsonElement o, string name, string path) =>
        OptionalInt(o, name, path) ?? throw new ModelFormatException($"{path}: required field '{name}' is missing");

    private static double RequiredDouble(JsonElement o, string name, string path) =>
        OptionalDouble(o, name, path) ?? throw new ModelFormatException($"{path}: required field '{name}' is missing");

    private static int? OptionalInt(JsonElement o, string name, string path)
    {
        if (!o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out int i)) return i;
        throw new ModelFormatException($"{path}: field '{name}' must be an integer, got {v.GetRawText()}");
    }

    private static double? OptionalDouble(JsonElement o, string name, string path)
    {
        if (!o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind == JsonValueKind.Number) return v.GetDouble();
        throw new ModelFormatException($"{path}: field '{name}' must be a number, got {v.GetRawText()}");
    }

    private static bool? OptionalBool(JsonElement o, string name, string path)
    {
        if (!o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind is JsonValueKind.True or JsonValueKind.False) return v.GetBoolean();
        throw new ModelFormatException($"{path}: field '{name}' must be true or false, got {v.GetRawText()}");
    }
}
