namespace MiniLlm.Loader;

/// <summary>A model directory opened and validated: config, mapped weights and tokenizer.</summary>
public sealed class ModelFiles : IDisposable
{
    public string Directory { get; }
    public LlamaConfig Config { get; }
    public Checkpoint Checkpoint { get; }
    public ModelWeights Weights { get; }
    public TextTokenizer? Tokenizer { get; }

    private ModelFiles(string dir, LlamaConfig config, Checkpoint ckpt, ModelWeights weights, TextTokenizer? tok)
    {
        Directory = dir; Config = config; Checkpoint = ckpt; Weights = weights; Tokenizer = tok;
    }

    /// <summary>Opens <paramref name="dir"/>. The tokenizer is optional only when <paramref name="requireTokenizer"/> is false.</summary>
    public static ModelFiles Open(string dir, bool requireTokenizer = true)
    {
        dir = Path.GetFullPath(dir);
        var config = LlamaConfig.Load(Path.Combine(dir, "config.json"));
        var ckpt = Checkpoint.Open(dir);
        try
        {
            var weights = ModelWeights.Bind(config, ckpt);
            var tokPath = Path.Combine(dir, "tokenizer.model");
            TextTokenizer? tok = null;
            if (File.Exists(tokPath) || requireTokenizer)
            {
                tok = TextTokenizer.Load(tokPath, addBos: true);
                if (tok.VocabSize > config.VocabSize)
                    throw new ModelFormatException($"{tokPath}: {tok.VocabSize} pieces but config.json vocab_size is {config.VocabSize}");
            }
            return new ModelFiles(dir, config, ckpt, weights, tok);
        }
        catch
        {
            ckpt.Dispose();
            throw;
        }
    }

    public void Dispose() => Checkpoint.Dispose();
}
