using MiniLlm.Kernels;
using MiniLlm.Loader;

namespace MiniLlm.Engine;

/// <summary>The ops of one forward step, in the order they run.</summary>
public enum OpKind
{
    Embedding, AttnNorm, QProj, KProj, VProj, Rope, AttnScores, Softmax, AttnValues, OProj, AttnResidual,
    FfnNorm, Gate, Up, SwiGlu, Down, FfnResidual, FinalNorm, LmHead,
}

/// <summary>
/// What one op of one layer costs in one step: FLOPs, and bytes moved by kind. Layer −1 = outside the layers
/// (embedding, final norm, LM head). Activations are fp32; weights and KV at their stored widths.
/// </summary>
public readonly record struct OpCost(OpKind Op, int Layer, double Flops, double WeightBytes, double ActivationBytes, double KvReadBytes, double KvWriteBytes)
{
    public double Bytes => WeightBytes + ActivationBytes + KvReadBytes + KvWriteBytes;
    /// <summary>FLOP per byte moved.</summary>
    public double Intensity => Bytes == 0 ? 0 : Flops / Bytes;
}

/// <summary>One sequence's part of a step: <see cref="NewTokens"/> run, context <see cref="ContextAfter"/> once they are in.</summary>
public readonly record struct StepSequence(int NewTokens, int ContextAfter);

/// <summary>
/// Counts FLOPs and bytes exactly as the engine does the work (DESIGN.md's table): logits only for the rows that
/// need them, the tied LM head reading the whole embedding table, each KV row read once per sequence per layer.
/// Conventions: a multiply-add is 2 FLOPs; softmax 5 per score (max, subtract, exp, sum, divide); RMSNorm 4 per
/// element; SwiGLU 4 per element (sigmoid, two multiplies); RoPE 6 per rotated pair; a residual add 1.
/// </summary>
public sealed class CostModel
{
    private readonly LlamaConfig _c;

    /// <summary>Bytes per weight element (4 fp32, 2 bf16/f16).</summary>
    public double WeightBytesPerElement { get; }
    /// <summary>Bytes per KV cache element.</summary>
    public double KvBytesPerElement { get; }

    /// <summary>Bytes per activation element moved to or from memory: 4 here (fp32); 0 to assume they stay on chip.</summary>
    public double ActivationBytesPerElement { get; }

    public CostModel(LlamaConfig config, double weightBytesPerElement, double kvBytesPerElement = 4, double activationBytesPerElement = 4)
    {
        _c = config;
        WeightBytesPerElement = weightBytesPerElement;
        KvBytesPerElement = kvBytesPerElement;
        ActivationBytesPerElement = activationBytesPerElement;
    }

    /// <summary>For a loaded model: weight width from its stored projection weights.</summary>
    public static CostModel For(LlamaModel model, KvType kv = KvType.F32) => new(model.Config, model.WeightBytesPerElement, KvView.SizeOf(kv));

    /// <summary>Every op of one step over <paramref name="sequences"/>; <paramref name="logitRows"/> rows go through the LM head.</summary>
    public List<OpCost> Step(IReadOnlyList<StepSequence> sequences, int logitRows)
    {
        var c = _c;
        double T = 0, qk = 0, kvRows = 0;
        foreach (var s in sequences)
        {
            T += s.NewTokens;
            double n = s.NewTokens, ctx = s.ContextAfter;
            qk += n * ctx - n * (n - 1) / 2;     // (query, key) pairs under the causal mask
            kvRows += ctx;                        // KV rows read: each sequence reads its cache once per layer
        }
        double d = c.HiddenSize, f = c.IntermediateSize, h = c.NumAttentionHeads, g = c.NumKeyValueHeads, hd = c.HeadDim, V = c.VocabSize;
        double w = WeightBytesPerElement, k = KvBytesPerElement, a = ActivationBytesPerElement;
        double normW = d * w;
        var ops = new List<OpCost>(c.NumHiddenLayers * 17 + 3);

        OpCost Linear(OpKind op, int layer, double rows, double inDim, double outDim, double kvWrite = 0) =>
            new(op, layer, 2 * rows * inDim * outDim, inDim * outDim * w, rows * (inDim + outDim) * a, 0, kvWrite);

        ops.Add(new(OpKind.Embedding, -1, 0, T * d * w, T * d * a, 0, 0));
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            ops.Add(new(OpKind.AttnNorm, l, 4 * T * d, normW, 2 * T * d * a, 0, 0));
            ops.Add(Linear(OpKind.QProj, l, T, d, h * hd));
            ops.Add(Linear(OpKind.KProj, l, T, d, g * hd, T * g * hd * k));
            ops.Add(Linear(OpKind.VProj, l, T, d, g * hd, T * g * hd * k));
            ops.Add(new(OpKind.Rope, l, 3 * T * (h + g) * hd, 0, 2 * T * (h + g) * hd * a, 0, 0));
            ops.Add(new(OpKind.AttnScores, l, 2 * h * hd * qk, 0, T * h * hd * a + h * qk * a, kvRows * g * hd * k, 0));
            ops.Add(new(OpKind.Softmax, l, 5 * h * qk, 0, 2 * h * qk * a, 0, 0));
            ops.Add(new(OpKind.AttnValues, l, 2 * h * hd * qk, 0, h * qk * a + T * h * hd * a, kvRows * g * hd * k, 0));
            ops.Add(Linear(OpKind.OProj, l, T, h * hd, d));
            ops.Add(new(OpKind.AttnResidual, l, T * d, 0, 3 * T * d * a, 0, 0));
            ops.Add(new(OpKind.FfnNorm, l, 4 * T * d, normW, 2 * T * d * a, 0, 0));
            ops.Add(Linear(OpKind.Gate, l, T, d, f));
            ops.Add(Linear(OpKind.Up, l, T, d, f));
            ops.Add(new(OpKind.SwiGlu, l, 4 * T * f, 0, 3 * T * f * a, 0, 0));
            ops.Add(Linear(OpKind.Down, l, T, f, d));
            ops.Add(new(OpKind.FfnResidual, l, T * d, 0, 3 * T * d * a, 0, 0));
        }
        ops.Add(new(OpKind.FinalNorm, -1, 4 * logitRows * d, normW, 2 * logitRows * d * a, 0, 0));
        ops.Add(Linear(OpKind.LmHead, -1, logitRows, d, V));
        return ops;
    }

    /// <summary>Totals of a step.</summary>
    public static (double Flops, double Bytes, double WeightBytes) Sum(IEnumerable<OpCost> ops)
    {
        double fl = 0, by = 0, wb = 0;
        foreach (var o in ops) { fl += o.Flops; by += o.Bytes; wb += o.WeightBytes; }
        return (fl, by, wb);
    }

    /// <summary>Prefill of <paramref name="tokens"/> from an empty cache, logits for the last token only.</summary>
    public (double Flops, double Bytes, double WeightBytes) Prefill(int tokens) => Sum(Step([new StepSequence(tokens, tokens)], 1));

    /// <summary>One decode step for <paramref name="batch"/> sequences each at context <paramref name="contextAfter"/>.</summary>
    public (double Flops, double Bytes, double WeightBytes) Decode(int batch, int contextAfter) =>
        Sum(Step(Enumerable.Repeat(new StepSequence(1, contextAfter), batch).ToList(), batch));
}
