using System.Text.RegularExpressions;

namespace MiniLlm.Loader;

/// <summary>One decoder layer's weights, as stored in the checkpoint (HF layout: a linear's weight is [out × in]).</summary>
public sealed record LayerWeights(
    TensorView AttnNorm,   // input_layernorm        [d]
    TensorView Wq,         // self_attn.q_proj       [h·hd × d]
    TensorView Wk,         // self_attn.k_proj       [g·hd × d]
    TensorView Wv,         // self_attn.v_proj       [g·hd × d]
    TensorView Wo,         // self_attn.o_proj       [d × h·hd]
    TensorView FfnNorm,    // post_attention_layernorm [d]
    TensorView Wgate,      // mlp.gate_proj          [f × d]
    TensorView Wup,        // mlp.up_proj            [f × d]
    TensorView Wdown);     // mlp.down_proj          [d × f]

/// <summary>Every tensor a Llama forward pass reads, checked for presence and shape against the config.</summary>
public sealed partial class ModelWeights
{
    public TensorView Embed { get; }            // model.embed_tokens.weight [V × d]
    public IReadOnlyList<LayerWeights> Layers { get; }
    public TensorView FinalNorm { get; }        // model.norm.weight [d]
    public TensorView LmHead { get; }           // lm_head.weight [V × d], or Embed when tied

    private ModelWeights(TensorView embed, IReadOnlyList<LayerWeights> layers, TensorView finalNorm, TensorView lmHead)
    {
        Embed = embed; Layers = layers; FinalNorm = finalNorm; LmHead = lmHead;
    }

    [GeneratedRegex(@"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")]
    private static partial Regex IgnorableTensor();

    /// <summary>Metadata key and value that mark MiniLlm's Q8_0 export; block layout: 32 weights → fp32 scale + 32 int8.</summary>
    public const string QuantKey = "minillm_quant", QuantQ8 = "q8_0";
    public const int Q8Block = 32, Q8BlockBytes = 36;

    /// <summary>True when the checkpoint is MiniLlm's Q8_0 export (matrices as U8 blocks).</summary>
    public bool Quantized { get; private init; }

    public static ModelWeights Bind(LlamaConfig c, Checkpoint ckpt)
    {
        var used = new HashSet<string>();
        bool quantized = ckpt.Files.Any(f => f.Metadata.TryGetValue(QuantKey, out var q) && q == QuantQ8);
        TensorView Get(string name, params long[] shape)
        {
            if (!ckpt.TryGet(name, out var t))
                throw new ModelFormatException($"{ckpt.Directory}: tensor '{name}' is missing (expected shape [{string.Join(", ", shape)}])");
            if (t.DType == DType.U8)
            {
                // MiniLlm's Q8_0 export: a matrix [rows × cols] is stored as rows of cols/32 blocks of 36 bytes.
                if (!quantized)
                    throw new ModelFormatException($"{t.File}: tensor '{name}' has dtype U8, which MiniLlm reads only in its own Q8_0 export ({QuantKey}={QuantQ8} in the metadata)");
                if (shape.Length != 2 || shape[1] % Q8Block != 0 || t.Shape.Length != 2 || t.Shape[0] != shape[0] || t.Shape[1] != shape[1] / Q8Block * Q8BlockBytes)
                    throw new ModelFormatException($"{t.File}: Q8_0 tensor '{name}' has shape {t.ShapeText}, expected [{shape[0]}, {(shape.Length == 2 ? shape[1] / Q8Block * Q8BlockBytes : 0)}] for [{string.Join(", ", shape)}] weights");
                used.Add(name);
                return t;
            }
            if (!t.Shape.AsSpan().SequenceEqual(shape))
                throw new ModelFormatException($"{t.File}: tensor '{name}' has shape {t.ShapeText}, expected [{string.Join(", ", shape)}] from config.json");
            used.Add(name);
            return t;
        }

        long d = c.HiddenSize, f = c.IntermediateSize, V = c.VocabSize, q = c.QDim, kv = c.KvDim;
        var embed = Get("model.embed_tokens.weight", V, d);
        var layers = new LayerWeights[c.NumHiddenLayers];
        for (int i = 0; i < layers.Length; i++)
        {
            string p = $"model.layers.{i}.";
            layers[i] = new LayerWeights(
                Get(p + "input_layernorm.weight", d),
                Get(p + "self_attn.q_proj.weight", q, d),
                Get(p + "self_attn.k_proj.weight", kv, d),
                Get(p + "self_attn.v_proj.weight", kv, d),
                Get(p + "self_attn.o_proj.weight", d, q),
                Get(p + "post_attention_layernorm.weight", d),
                Get(p + "mlp.gate_proj.weight", f, d),
                Get(p + "mlp.up_proj.weight", f, d),
                Get(p + "mlp.down_proj.weight", d, f));
        }
        var norm = Get("model.norm.weight", d);
        TensorView lmHead;
        if (c.TieWordEmbeddings)
        {
            lmHead = embed;
            // Some tied checkpoints still carry a copy of the head; accept it if it is the right shape, and use the embedding.
            if (ckpt.Contains("lm_head.weight")) Get("lm_head.weight", V, d);
        }
        else lmHead = Get("lm_head.weight", V, d);

        foreach (var t in ckpt.Tensors)
            if (!used.Contains(t.Name) && !IgnorableTensor().IsMatch(t.Name))
                throw new ModelFormatException($"{t.File}: unexpected tensor '{t.Name}' {t.ShapeText} (not part of a {c.NumHiddenLayers}-layer Llama with this config)");
        return new ModelWeights(embed, layers, norm, lmHead) { Quantized = quantized };
    }

    /// <summary>Every tensor the forward pass reads, each once (the tied head is not counted twice).</summary>
    public IEnumerable<TensorView> All()
    {
        yield return Embed;
        foreach (var l in Layers)
        {
            yield return l.AttnNorm; yield return l.Wq; yield return l.Wk; yield return l.Wv; yield return l.Wo;
            yield return l.FfnNorm; yield return l.Wgate; yield return l.Wup; yield return l.Wdown;
        }
        yield return FinalNorm;
        if (LmHead.Pointer != Embed.Pointer) yield return LmHead;
    }
}
