using System.CommandLine;
using System.Text.Json;
using MiniLlm.Engine;
using MiniLlm.Loader;
using Spectre.Console;

namespace MiniLlm.Cli;

/// <summary><c>minillm perplexity</c>: how well a model (and its quantized form) predicts a text.</summary>
public static class PerplexityCommand
{
    public static Command Create(CliIO io)
    {
        var file = new Option<string>("--file", "-f") { Description = "Text file to score", Required = true };
        var model = CommonOptions.Model();
        var context = new Option<int>("--context", "-c") { Description = "Window length in tokens (default: the model's context, at most 512)", DefaultValueFactory = _ => 0 };
        var weights = CommonOptions.Weights();
        var mmap = CommonOptions.Mmap();
        var q8Act = CommonOptions.Q8Activations();
        var threads = CommonOptions.Threads();
        var chunks = new Option<int>("--chunks") { Description = "Score only the first N windows (0 = all)", DefaultValueFactory = _ => 0 };
        var output = CommonOptions.Output();
        var cmd = new Command("perplexity", "Perplexity over a text file (llama.cpp convention: non-overlapping windows, second half of each scored)")
        {
            file, model, context, weights, mmap, q8Act, threads, chunks, output,
        };
        cmd.SetAction(r =>
        {
            string path = r.GetValue(file)!;
            if (!File.Exists(path)) throw new ArgumentException($"{path}: file not found", "file");
            int t = RooflineCommand.ResolveThreads(r.GetValue(threads));
            var dir = ModelLocator.Resolve(r.GetValue(model));
            var files = ModelFiles.Open(dir);
            int ctx = r.GetValue(context) is > 0 and var c ? c : Math.Min(512, files.Config.MaxPositionEmbeddings);
            using var llm = new LlamaModel(files, t, maxTokens: ctx, ownsFiles: true, format: CommonOptions.Format(r.GetValue(weights)!), mapWeights: r.GetValue(mmap));
            llm.Q8Int8Activations = r.GetValue(q8Act) == "int8";
            var tokens = llm.Tokenizer.Encode(File.ReadAllText(path));
            int limit = r.GetValue(chunks);
            if (limit > 0) tokens = tokens[..Math.Min(tokens.Length, limit * ctx)];
            PerplexityResult res;
            if (!Console.IsErrorRedirected && io.Err == Console.Error && r.GetValue(output) != "json")
            {
                var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });
                PerplexityResult? got = null;
                console.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                    .Start(pc =>
                    {
                        var task = pc.AddTask($"perplexity ({tokens.Length / ctx} windows of {ctx})", maxValue: Math.Max(1, tokens.Length / ctx));
                        got = Perplexity.Compute(llm, tokens, ctx, (done, _) => task.Value = done);
                    });
                res = got!;
            }
            else res = Perplexity.Compute(llm, tokens, ctx);
            if (r.GetValue(output) == "json")
                io.Out.WriteLine(JsonSerializer.Serialize(new
                {
                    model = dir, weights = llm.WeightLabel, file = path, context = ctx, perplexity = res.Perplexity, mean_nll = res.MeanNll,
                    windows = res.Chunks, scored_tokens = res.ScoredTokens, seconds = res.Seconds,
                }));
            else
                io.Out.WriteLine($"perplexity {res.Perplexity:F4} (mean NLL {res.MeanNll:F4}) — {Path.GetFileName(dir.TrimEnd('/'))} {llm.WeightLabel}, " +
                                 $"{res.Chunks} windows of {ctx}, {res.ScoredTokens} tokens scored, {res.Seconds:F1} s");
            return ExitCodes.Ok;
        });
        return cmd;
    }
}
