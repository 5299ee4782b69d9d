namespace MiniLlm.Tests;

/// <summary>
/// The independent reference: a Llama forward pass in double precision, written plainly from the Hugging Face
/// definition, sharing no code with src/. Full recompute of every position (no KV cache).
/// </summary>
public sealed class NaiveLlama
{
    private readonly RandomModelSpec _s;
    private readonly Dictionary<string, (long[] Shape, float[] Values)> _w;

    public NaiveLlama(RandomModel model)
    {
        _s = model.Spec;
        _w = model.Tensors;
    }

    /// <summary>Multiply-adds done by the linear layers and by attention (QKᵀ and ·V) in the last <see cref="Logits"/> call.</summary>
    public long LinearMacs { get; private set; }
    public long AttentionMacs { get; private set; }

    private double[] Vec(string name) => _w[name].Values.Select(v => (double)v).ToArray();

    /// <summary>y = W·x for W [rows × cols] stored row-major.</summary>
    private double[] Linear(string name, double[] x)
    {
        var (shape, w) = _w[name];
        int rows = (int)shape[0], cols = (int)shape[1];
        LinearMacs += (long)rows * cols;
        var y = new double[rows];
        for (int r = 0; r < rows; r++)
        {
            double s = 0;
            for (int c = 0; c < cols; c++) s += (double)w[(long)r * cols + c] * x[c];
            y[r] = s;
        }
        return y;
    }

    private static double[] RmsNorm(double[] x, double[] w, double eps)
    {
        double ms = x.Sum(v => v * v) / x.Length;
        double inv = 1 / Math.Sqrt(ms + eps);
        return x.Select((v, i) => v * inv * w[i]).ToArray();
    }

    private double[] InvFreq()
    {
        int hd = _s.HeadDim;
        var inv = new double[hd / 2];
        for (int i = 0; i < hd / 2; i++) inv[i] = 1.0 / Math.Pow(_s.RopeTheta, 2.0 * i / hd);
        if (_s.Llama3Scaling is var (factor, low, high, orig))
        {
            double lowWl = orig / low, highWl = orig / high;
            for (int i = 0; i < inv.Length; i++)
            {
                double wl = 2 * Math.PI / inv[i];
                if (wl < highWl) continue;
                if (wl > lowWl) { inv[i] /= factor; continue; }
                double smooth = (orig / wl - low) / (high - low);
                inv[i] = (1 - smooth) * inv[i] / factor + smooth * inv[i];
            }
        }
        return inv;
    }

    private void Rope(double[] v, int heads, int pos, double[] inv)
    {
        int hd = _s.HeadDim, half = hd / 2;
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++)
            {
                double a = v[h * hd + i], b = v[h * hd + i + half];
                double c = Math.Cos(pos * inv[i]), s = Math.Sin(pos * inv[i]);
                v[h * hd + i] = a * c - b * s;
                v[h * hd + i + half] = b * c + a * s;
            }
    }

    /// <summary>Logits [S][V] for every position of <paramref name="tokens"/>.</summary>
    public double[][] Logits(int[] tokens)
    {
        int S = tokens.Length, d = _s.Hidden, hd = _s.HeadDim, H = _s.Heads, G = _s.KvHeads;
        const double eps = 1e-5;
        LinearMacs = 0;
        AttentionMacs = 0;
        var inv = InvFreq();
        var (_, emb) = _w["model.embed_tokens.weight"];
        var x = new double[S][];
        for (int t = 0; t < S; t++) x[t] = Enumerable.Range(0, d).Select(i => (double)emb[(long)tokens[t] * d + i]).ToArray();

        for (int l = 0; l < _s.Layers; l++)
        {
            string p = $"model.layers.{l}.";
            var keys = new double[S][];
            var values = new double[S][];
            var queries = new double[S][];
            for (int t = 0; t < S; t++)
            {
                var xn = RmsNorm(x[t], Vec(p + "input_layernorm.weight"), eps);
                queries[t] = Linear(p + "self_attn.q_proj.weight", xn);
                keys[t] = Linear(p + "self_attn.k_proj.weight", xn);
                values[t] = Linear(p + "self_attn.v_proj.weight", xn);
                Rope(queries[t], H, t, inv);
                Rope(keys[t], G, t, inv);
            }
            for (int t = 0; t < S; t++)
            {
                var att = new double[H * hd];
                for (int h = 0; h < H; h++)
                {
                    int g = h / (H / G);
                    var scores = new double[t + 1];
                    for (int j = 0; j <= t; j++)
                    {
                        double s = 0;
                        for (int i = 0; i < hd; i++) s += queries[t][h * hd + i] * keys[j][g * hd + i];
                        AttentionMacs += 2L * hd;   // this score, and its share of ·V below
                        scores[j] = s / Math.Sqrt(hd);
                    }
                    double max = scores.Max();
                    var e = scores.Select(v => Math.Exp(v - max)).ToArray();
                    double sum = e.Sum();
                    for (int j = 0; j <= t; j++)
                        for (int i = 0; i < hd; i++) att[h * hd + i] += e[j] / sum * values[j][g * hd + i];
                }
                var o = Linear(p + "self_attn.o_proj.weight", att);
                for (int i = 0; i < d; i++) x[t][i] += o[i];
            }
            for (int t = 0; t < S; t++)
            {
                var xn = RmsNorm(x[t], Vec(p + "post_attention_layernorm.weight"), eps);
                var gate = Linear(p + "mlp.gate_proj.weight", xn);
                var up = Linear(p + "mlp.up_proj.weight", xn);
                var hmid = gate.Select((gv, i) => gv / (1 + Math.Exp(-gv)) * up[i]).ToArray();
                var down = Linear(p + "mlp.down_proj.weight", hmid);
                for (int i = 0; i < d; i++) x[t][i] += down[i];
            }
        }
        string head = _s.Tied ? "model.embed_tokens.weight" : "lm_head.weight";
        return x.Select(xt => Linear(head, RmsNorm(xt, Vec("model.norm.weight"), eps))).ToArray();
    }
}
