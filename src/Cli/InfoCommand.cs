using System.CommandLine;
using MiniLlm.Loader;
using Spectre.Console;

namespace MiniLlm.Cli;

/// <summary><c>minillm info</c>: the config, parameter count, bytes by dtype and every tensor.</summary>
public static class InfoCommand
{
    public static Command Create(CliIO io)
    {
        var model = CommonOptions.Model();
        var cmd = new Command("info", "Describe a model: config, parameters, bytes by dtype, tensor table") { model };
        cmd.SetAction(r =>
        {
            var dir = ModelLocator.Resolve(r.GetValue(model));
            using var files = ModelFiles.Open(dir, requireTokenizer: false);
            var console = AnsiConsole.Create(new AnsiConsoleSettings
            {
                Out = new AnsiConsoleOutput(io.Out),
                Ansi = AnsiSupport.No,
                ColorSystem = ColorSystemSupport.NoColors,
                Interactive = InteractionSupport.No,
            });
            // Wide enough that tensor names never wrap when the output is piped or captured.
            console.Profile.Width = Math.Max(140, Console.IsOutputRedirected ? 0 : SafeWindowWidth());
            Print(console, files);
            return ExitCodes.Ok;
        });
        return cmd;
    }

    private static int SafeWindowWidth()
    {
        try { return Console.WindowWidth; } catch (IOException) { return 0; }
    }

    private static void Print(IAnsiConsole console, ModelFiles files)
    {
        var c = files.Config;
        console.WriteLine($"model: {files.Directory}");
        var cfg = new Table().AddColumn("field").AddColumn("value");
        void Row(string k, object? v) => cfg.AddRow(Markup.Escape(k), Markup.Escape(v?.ToString() ?? "-"));
        Row("hidden_size (d)", c.HiddenSize);
        Row("intermediate_size (f)", c.IntermediateSize);
        Row("num_hidden_layers", c.NumHiddenLayers);
        Row("num_attention_heads (h)", c.NumAttentionHeads);
        Row("num_key_value_heads (g)", c.NumKeyValueHeads);
        Row("head_dim (hd)", c.HeadDim);
        Row("vocab_size (V)", c.VocabSize);
        Row("max_position_embeddings", c.MaxPositionEmbeddings);
        Row("rms_norm_eps", c.RmsNormEps);
        Row("rope_theta", c.RopeTheta);
        Row("rope_scaling", c.RopeScaling is { } s ? $"llama3 factor {s.Factor}, low {s.LowFreqFactor}, high {s.HighFreqFactor}, original {s.OriginalMaxPositionEmbeddings}" : "none");
        Row("tie_word_embeddings", c.TieWordEmbeddings);
        Row("bos / eos", $"{c.BosTokenId?.ToString() ?? "-"} / {string.Join(",", c.EosTokenIds)}");
        Row("torch_dtype", c.TorchDtype);
        if (files.Tokenizer is { } tok) Row("tokenizer", $"{tok.VocabSize} pieces, SentencePiece BPE");
        console.Write(cfg);

        var all = files.Weights.All().ToList();
        // A Q8_0 export stores 32 weights in 36 bytes.
        static long Params(TensorView t) => t.DType == DType.U8 ? t.ByteLength / ModelWeights.Q8BlockBytes * ModelWeights.Q8Block : t.ElementCount;
        long parameters = all.Sum(Params);
        console.WriteLine($"parameters: {parameters:N0}{(c.TieWordEmbeddings ? " (embedding tied to the LM head, counted once)" : "")}");
        var byType = new Table().AddColumn("dtype").AddColumn("tensors").AddColumn(new TableColumn("parameters").RightAligned()).AddColumn(new TableColumn("bytes").RightAligned());
        foreach (var g in files.Checkpoint.Tensors.GroupBy(t => t.DType).OrderBy(g => g.Key))
            byType.AddRow(g.Key == DType.U8 ? "U8 (Q8_0)" : DTypes.Name(g.Key), g.Count().ToString(), g.Sum(Params).ToString("N0"), $"{g.Sum(t => t.ByteLength):N0} ({g.Sum(t => t.ByteLength) / 1048576.0:F1} MiB)");
        console.Write(byType);

        var tensors = new Table().AddColumn("tensor").AddColumn("dtype").AddColumn("shape").AddColumn(new TableColumn("bytes").RightAligned()).AddColumn("file");
        foreach (var t in files.Checkpoint.Tensors.OrderBy(t => t.File, StringComparer.Ordinal).ThenBy(t => t.Pointer))
            tensors.AddRow(Markup.Escape(t.Name), DTypes.Name(t.DType), Markup.Escape(t.ShapeText), t.ByteLength.ToString("N0"), Markup.Escape(Path.GetFileName(t.File)));
        console.Write(tensors);
    }
}
