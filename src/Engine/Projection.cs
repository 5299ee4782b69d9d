using MiniLlm.Loader;

namespace MiniLlm.Engine;

/// <summary>What a model would do on a device, from the roofline: time = max(FLOPs ÷ (peak·e_c), bytes ÷ (BW·e_bw)).</summary>
public sealed record ProjectionRow(int Batch, double TtftMs, double TpotMs, double DecodeTokensPerSecond, string Bound, double Intensity);

public sealed record ProjectionResult(
    string Model, HardwareProfile Hardware, string DType, int PromptTokens, int GenTokens, double ComputeEfficiency, double BandwidthEfficiency,
    double WeightBytes, double ParametersB, double RidgeFlopsPerByte, int ComputeBoundBatch, int MaxBatchByKv, double KvBytesPerSequence,
    IReadOnlyList<ProjectionRow> Rows, IReadOnlyList<(string Flag, string Value, string Why)> VllmArgs);

public static class Projection
{
    /// <summary>Every parameter of the model (embedding table, untied head, all layers, norms).</summary>
    public static double Parameters(LlamaConfig c)
    {
        double d = c.HiddenSize, f = c.IntermediateSize, q = c.QDim, kv = c.KvDim, V = c.VocabSize;
        double layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d;
        return V * d * (c.TieWordEmbeddings ? 1 : 2) + c.NumHiddenLayers * layer + d;
    }

    /// <summary>Bytes per weight for a projection dtype.</summary>
    public static double WeightWidth(string dtype) => dtype switch
    {
        "bf16" or "fp16" => 2,
        "fp8" => 1,
        "int4" => 0.5 + 2.0 / 32,   // 4-bit weights plus one fp16 scale per 32
        "fp32" => 4,
        _ => throw new ArgumentException($"unknown dtype '{dtype}' (bf16, fp16, fp8, int4, fp32)", "dtype"),
    };

    public static ProjectionResult Run(string modelName, LlamaConfig c, HardwareProfile hw, string dtype, int promptTokens, int genTokens,
        IReadOnlyList<int> batches, double computeEff = 1.0, double bandwidthEff = 1.0, double ttftTargetMs = 500, string kvDtype = "auto")
    {
        if (promptTokens < 1) throw new ArgumentException("prompt-tokens must be ≥ 1", "prompt-tokens");
        if (genTokens < 1) throw new ArgumentException("gen-tokens must be ≥ 1", "gen-tokens");
        if (!(computeEff is > 0 and <= 1) || !(bandwidthEff is > 0 and <= 1)) throw new ArgumentException("efficiencies must be in (0, 1]", "efficiency");
        double w = WeightWidth(dtype);
        double kvWidth = kvDtype == "fp8" || kvDtype == "auto" && dtype is "fp8" ? 1 : 2;
        // GPU kernels keep activations on chip (fused, bf16): count weights and KV, as the roofline projections in the field do.
        var cost = new CostModel(c, w, kvWidth, activationBytesPerElement: 0);
        double peak = hw.PeakFlops(dtype) * computeEff, bw = hw.BandwidthBytes * bandwidthEff;
        double Seconds(double flops, double bytes) => Math.Max(flops / peak, bytes / bw);

        // Prefill of the prompt, one sequence: its FLOPs against the compute roof, its bytes against the memory roof.
        var (pf, pb, _) = cost.Prefill(promptTokens);
        double ttft = Seconds(pf, pb) * 1000;

        // Decode at the middle of generation (context = prompt + half the new tokens).
        int ctx = promptTokens + genTokens / 2;
        var rows = new List<ProjectionRow>();
        foreach (int b in batches)
        {
            var (f, by, _) = cost.Decode(b, ctx);
            double t = Seconds(f, by);
            rows.Add(new ProjectionRow(b, ttft, t * 1000, b / t, f / peak >= by / bw ? "compute" : "memory", f / by));
        }

        double parameters = Parameters(c);
        double weightBytes = parameters * w;
        double ridge = hw.PeakFlops(dtype) / hw.BandwidthBytes;
        // Smallest batch whose decode step is compute-bound; −1 if none up to 65536 (each sequence's KV reads grow
        // with the batch as fast as its FLOPs, so long-context MHA decode may never get there).
        bool ComputeBound(int b)
        {
            var (f, by, _) = cost.Decode(b, ctx);
            return f / peak >= by / bw;
        }
        int knee = -1;
        for (int b = 1; b <= 1 << 16; b *= 2)
            if (ComputeBound(b)) { knee = b; break; }
        if (knee > 1)
        {
            int lo = knee / 2, hi = knee;     // lo memory-bound, hi compute-bound
            while (hi - lo > 1) { int mid = (lo + hi) / 2; if (ComputeBound(mid)) hi = mid; else lo = mid; }
            knee = hi;
        }
        double kvPerSeq = 2.0 * c.NumHiddenLayers * c.KvDim * kvWidth * (promptTokens + genTokens);
        double free = hw.MemoryGB * 1e9 * 0.9 - weightBytes;   // vLLM's default gpu_memory_utilization 0.9
        int maxBatch = free <= 0 ? 0 : (int)Math.Min(int.MaxValue, free / kvPerSeq);

        var args = new List<(string, string, string)>();
        if (maxBatch < 1)
        {
            int tp = (int)Math.Ceiling((weightBytes + kvPerSeq) / (hw.MemoryGB * 1e9 * 0.9));
            args.Add(("--tensor-parallel-size", tp.ToString(), $"{weightBytes / 1e9:F1} GB of weights do not fit in one {hw.MemoryGB} GB device (× 0.9 usable); the figures above are per device's worth of bandwidth"));
        }
        else
            args.Add(("--max-num-seqs", Math.Min(maxBatch, 1024).ToString(), $"KV cache for {promptTokens + genTokens}-token sequences fits {maxBatch} of them in {hw.MemoryGB} GB × 0.9 after {weightBytes / 1e9:F1} GB of weights"));
        double tokensForRidge = Math.Ceiling(ridge * w / 2);
        double perTokenFlops = pf / promptTokens;
        double tokensForTtft = ttftTargetMs / 1000 * peak / perTokenFlops;
        int batched = (int)Math.Clamp(Math.Pow(2, Math.Ceiling(Math.Log2(Math.Max(tokensForRidge, 1)))), 256, Math.Max(256, tokensForTtft));
        args.Add(("--max-num-batched-tokens", batched.ToString(), $"a step turns compute-bound past ~{tokensForRidge:F0} tokens (ridge {ridge:F0} FLOP/byte at {w} B/weight); a {batched}-token prefill chunk takes {batched * perTokenFlops / peak * 1000:F1} ms, within the {ttftTargetMs} ms TTFT target"));
        string kv = kvWidth == 1 ? "fp8" : maxBatch < 64 && hw.Fp8Tflops > 0 ? "fp8" : "auto";
        args.Add(("--kv-cache-dtype", kv, kv == "fp8" ? "fp8 KV halves the cache, doubling the batch that fits" : "the cache holds enough sequences at 16-bit; keep full precision"));
        return new ProjectionResult(modelName, hw, dtype, promptTokens, genTokens, computeEff, bandwidthEff, weightBytes, parameters / 1e9,
            ridge, knee, maxBatch, kvPerSeq, rows, args);
    }
}
