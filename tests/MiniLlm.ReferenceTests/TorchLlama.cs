using MiniLlm.Loader;
using TorchSharp;
using static TorchSharp.torch;

namespace MiniLlm.ReferenceTests;

/// <summary>libtorch must load; if it does not, every test says so instead of being skipped.</summary>
public static class TorchCheck
{
    private static readonly Lazy<Exception?> Failure = new(() =>
    {
        try
        {
            using var t = torch.ones(2, 2).matmul(torch.ones(2, 2));
            return t.sum().item<float>() == 8f ? null : new InvalidOperationException("libtorch computed a wrong 2×2 product");
        }
        catch (Exception e) { return e; }
    });

    public static void Ensure()
    {
        if (Failure.Value is { } e)
            throw new InvalidOperationException(
                $"libtorch (libtorch-cpu-linux-x64 via TorchSharp) failed to load, so the reference checks cannot run: {e.Message} " +
                "(TorchSharp's native shim needs GLIBCXX_3.4.32; tests/MiniLlm.ReferenceTests/native/setup-libstdcxx.sh provides it for this test host)", e);
    }
}

/// <summary>
/// The Llama forward pass in TorchSharp ops, following the Hugging Face LlamaForCausalLM code: RMSNorm as
/// weight · (x · rsqrt(mean(x²) + eps)), rotate-half RoPE with cos/sin of cat(freqs, freqs), repeat_kv for grouped
/// heads, a causal mask by −∞ fill, softmax in fp32, SwiGLU, tied or untied head. Full recompute, no cache.
/// Weights come from the files MiniLlm.Loader maps, widened to fp32 (bf16/f16 math in fp32, as expected.json).
/// </summary>
public sealed class TorchLlama : IDisposable
{
    private readonly LlamaConfig _c;
    private readonly Dictionary<string, Tensor> _w = new();
    private readonly bool _tied;

    public TorchLlama(ModelFiles files)
    {
        TorchCheck.Ensure();
        _c = files.Config;
        _tied = files.Config.TieWordEmbeddings;
        foreach (var t in files.Checkpoint.Tensors) _w[t.Name] = ToTorch(t);
    }

    public static Tensor ToTorch(TensorView t)
    {
        var data = new float[t.ElementCount];
        for (long i = 0; i < data.Length; i++) data[i] = t.GetFloat(i);
        return torch.tensor(data, t.Shape);
    }

    private Tensor RmsNorm(Tensor x, string weight)
    {
        var variance = x.pow(2).mean([-1], keepdim: true);
        return _w[weight] * (x * torch.rsqrt(variance + _c.RmsNormEps));
    }

    private static Tensor RotateHalf(Tensor x)
    {
        long half = x.shape[^1] / 2;
        return torch.cat([-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
    }

    /// <summary>HF inverse frequencies, with the llama3 smoothing when the config asks for it.</summary>
    private Tensor InvFreq()
    {
        int hd = _c.HeadDim;
        var inv = 1.0 / torch.pow(_c.RopeTheta, torch.arange(0, hd, 2, dtype: ScalarType.Int64).to_type(ScalarType.Float32) / hd);
        if (_c.RopeScaling is not { } s) return inv;
        double lowWl = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor, highWl = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
        var wavelen = 2 * Math.PI / inv;
        var scaled = torch.where(wavelen > lowWl, inv / s.Factor, inv);
        var smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
        var smoothed = (1 - smooth) * scaled / s.Factor + smooth * scaled;
        var medium = (wavelen >= highWl).logical_and(wavelen <= lowWl);
        return torch.where(medium, smoothed, scaled);
    }

    /// <summary>Logits [S × V] for every position.</summary>
    public float[] Logits(int[] ids)
    {
        using var scope = torch.NewDisposeScope();
        int S = ids.Length, H = _c.NumAttentionHeads, G = _c.NumKeyValueHeads, hd = _c.HeadDim;
        var x = _w["model.embed_tokens.weight"].index_select(0, torch.tensor(ids.Select(i => (long)i).ToArray()));
        var pos = torch.arange(S, dtype: ScalarType.Float32);
        var freqs = torch.outer(pos, InvFreq());
        var emb = torch.cat([freqs, freqs], -1);
        var cos = emb.cos();
        var sin = emb.sin();
        var mask = torch.ones(S, S, dtype: ScalarType.Bool).triu(1);
        for (int l = 0; l < _c.NumHiddenLayers; l++)
        {
            string p = $"model.layers.{l}.";
            var h = RmsNorm(x, p + "input_layernorm.weight");
            var q = h.matmul(_w[p + "self_attn.q_proj.weight"].t()).view(S, H, hd).transpose(0, 1);   // [H, S, hd]
            var k = h.matmul(_w[p + "self_attn.k_proj.weight"].t()).view(S, G, hd).transpose(0, 1);   // [G, S, hd]
            var v = h.matmul(_w[p + "self_attn.v_proj.weight"].t()).view(S, G, hd).transpose(0, 1);
            q = q * cos + RotateHalf(q) * sin;
            k = k * cos + RotateHalf(k) * sin;
            k = k.repeat_interleave(H / G, 0);
            v = v.repeat_interleave(H / G, 0);
            var scores = q.matmul(k.transpose(1, 2)) * (1.0 / Math.Sqrt(hd));
            scores = scores.masked_fill(mask, float.NegativeInfinity);
            var o = scores.softmax(-1).matmul(v).transpose(0, 1).reshape(S, H * hd);
            x = x + o.matmul(_w[p + "self_attn.o_proj.weight"].t());
            h = RmsNorm(x, p + "post_attention_layernorm.weight");
            var mlp = torch.nn.functional.silu(h.matmul(_w[p + "mlp.gate_proj.weight"].t())) * h.matmul(_w[p + "mlp.up_proj.weight"].t());
            x = x + mlp.matmul(_w[p + "mlp.down_proj.weight"].t());
        }
        var head = _tied ? _w["model.embed_tokens.weight"] : _w["lm_head.weight"];
        var logits = RmsNorm(x, "model.norm.weight").matmul(head.t());
        return logits.contiguous().data<float>().ToArray();
    }

    public void Dispose()
    {
        foreach (var t in _w.Values) t.Dispose();
    }
}
