// A user's-eye sample: find a model, generate a continuation, stream it, and report the speed.
//   dotnet run --project samples/Generate -c Release -- "In the beginning"
using MiniLlm.Engine;
using MiniLlm.Loader;

string prompt = args.Length > 0 ? args[0] : "In the beginning";
string model = args.Length > 1 ? args[1] : ModelLocator.DefaultModel;

using var llm = LlamaModel.Load(ModelLocator.Resolve(model));
llm.Warmup();
var generator = new Generator(llm);
var options = new GenerationOptions
{
    MaxTokens = 64,
    Sampling = new SamplingParams { Temperature = 0.7f, TopP = 0.9f, Seed = 2026 },
};

Console.Write(prompt);
var result = generator.Generate(prompt, options, (_, text) => Console.Write(text));
Console.WriteLine();
Console.WriteLine($"{result.OutputIds.Length} tokens, stop: {StopReasons.Name(result.StopReason)}, " +
                  $"prefill {result.PrefillTokensPerSecond:F0} tok/s, decode {result.DecodeTokensPerSecond:F0} tok/s");
