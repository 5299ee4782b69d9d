using System.CommandLine;
using MiniLlm.Engine;
using MiniLlm.Loader;

namespace MiniLlm.Cli;

/// <summary><c>minillm quantize</c>: save a Q8_0 copy of a model (safetensors, its own dtype tag in the metadata).</summary>
public static class QuantizeCommand
{
    public static Command Create(CliIO io)
    {
        var model = CommonOptions.Model();
        var outDir = new Option<string>("--out") { Description = "Directory to write the quantized model to", Required = true };
        var type = new Option<string>("--type") { Description = "Quantization", DefaultValueFactory = _ => "q8" }.AcceptOnlyFromAmong("q8");
        var cmd = new Command("quantize", "Write a Q8_0 copy of a model: matrices as 32-weight blocks (fp32 scale + 32 int8), norms in fp32") { model, outDir, type };
        cmd.SetAction(r =>
        {
            var dir = ModelLocator.Resolve(r.GetValue(model));
            string dst = Path.GetFullPath(r.GetValue(outDir)!);
            if (Path.GetFullPath(dir) == dst) throw new ArgumentException("--out must differ from the model directory", "out");
            Directory.CreateDirectory(dst);
            using var llm = LlamaModel.Load(dir, format: WeightFormat.Q8);
            llm.SaveWeights(Path.Combine(dst, Checkpoint.SingleFile));
            foreach (var f in new[] { "config.json", "tokenizer.model", "generation_config.json" })
                if (File.Exists(Path.Combine(dir, f))) File.Copy(Path.Combine(dir, f), Path.Combine(dst, f), overwrite: true);
            long before = llm.Files.Checkpoint.Files.Sum(f => f.FileLength), after = new FileInfo(Path.Combine(dst, Checkpoint.SingleFile)).Length;
            io.Out.WriteLine($"wrote {dst}: {after / 1048576.0:F1} MiB (from {before / 1048576.0:F1} MiB, {llm.WeightLabel})");
            return ExitCodes.Ok;
        });
        return cmd;
    }
}
