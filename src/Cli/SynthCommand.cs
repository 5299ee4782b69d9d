using System.CommandLine;
using MiniLlm.Engine;
using MiniLlm.Loader;

namespace MiniLlm.Cli;

/// <summary><c>minillm synth</c>: write a seeded random-weight model of a known shape, too big for the caches.</summary>
public static class SynthCommand
{
    public static Command Create(CliIO io)
    {
        var shape = new Option<string?>("--shape") { Description = $"Known shape: {string.Join(", ", ModelShape.Known.Keys)} (or give the dimensions below)" };
        var dtype = new Option<string>("--dtype") { Description = "Weight dtype: f32, bf16 or f16", DefaultValueFactory = _ => "f32" };
        var outDir = new Option<string>("--out") { Description = "Directory to write", Required = true };
        var seed = new Option<ulong>("--seed") { Description = "Random seed", DefaultValueFactory = _ => 0 };
        var hidden = new Option<int?>("--hidden") { Description = "hidden_size" };
        var layers = new Option<int?>("--layers") { Description = "num_hidden_layers" };
        var ffn = new Option<int?>("--ffn") { Description = "intermediate_size" };
        var heads = new Option<int?>("--heads") { Description = "num_attention_heads" };
        var kvHeads = new Option<int?>("--kv-heads") { Description = "num_key_value_heads (default: heads)" };
        var vocab = new Option<int?>("--vocab") { Description = "vocab_size (32000 and 4096 get a real tokenizer)" };
        var context = new Option<int?>("--context") { Description = "max_position_embeddings" };
        var tied = new Option<bool?>("--tied") { Description = "Tie the LM head to the embedding" };
        var cmd = new Command("synth", "Write a seeded random-weight Llama in Hugging Face layout")
        {
            shape, dtype, outDir, seed, hidden, layers, ffn, heads, kvHeads, vocab, context, tied,
        };
        cmd.SetAction(r =>
        {
            var name = r.GetValue(shape);
            ModelShape s = name != null ? ModelShape.Get(name) : new ModelShape("custom",
                r.GetValue(hidden) ?? throw new ArgumentException("--hidden is required without --shape", "hidden"),
                r.GetValue(ffn) ?? throw new ArgumentException("--ffn is required without --shape", "ffn"),
                r.GetValue(layers) ?? throw new ArgumentException("--layers is required without --shape", "layers"),
                r.GetValue(heads) ?? throw new ArgumentException("--heads is required without --shape", "heads"),
                0, 32000, 2048, false);
            s = s with
            {
                Hidden = r.GetValue(hidden) ?? s.Hidden,
                Intermediate = r.GetValue(ffn) ?? s.Intermediate,
                Layers = r.GetValue(layers) ?? s.Layers,
                Heads = r.GetValue(heads) ?? s.Heads,
                Vocab = r.GetValue(vocab) ?? s.Vocab,
                Context = r.GetValue(context) ?? s.Context,
                Tied = r.GetValue(tied) ?? s.Tied,
            };
            s = s with { KvHeads = r.GetValue(kvHeads) ?? (s.KvHeads == 0 ? s.Heads : s.KvHeads) };
            foreach (var (v, n) in new[] { (s.Hidden, "hidden"), (s.Intermediate, "ffn"), (s.Layers, "layers"), (s.Heads, "heads"), (s.KvHeads, "kv-heads"), (s.Vocab, "vocab"), (s.Context, "context") })
                if (v <= 0) throw new ArgumentException($"{n} must be positive, got {v}", n);
            var dt = DTypes.ParseUser(r.GetValue(dtype)!);
            string dir = Path.GetFullPath(r.GetValue(outDir)!);
            SyntheticModel.Write(s, dt, dir, r.GetValue(seed));
            long bytes = new FileInfo(Path.Combine(dir, Checkpoint.SingleFile)).Length;
            io.Out.WriteLine($"wrote {s.Name} ({DTypes.Name(dt)}, {bytes / 1048576.0:F0} MiB of weights) to {dir}" +
                (File.Exists(Path.Combine(dir, "tokenizer.model")) ? "" : " (no tokenizer: vocab is neither 32000 nor 4096)"));
            return ExitCodes.Ok;
        });
        return cmd;
    }
}
