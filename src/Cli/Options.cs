using System.CommandLine;

namespace MiniLlm.Cli;

/// <summary>Options shared by several commands.</summary>
public static class CommonOptions
{
    public static Option<string?> Model() => new("--model", "-m")
    {
        Description = "Model directory, or a name looked up under $MINILLM_MODELS, models/ and ../shared/models/ (default: tiny-kjv)",
    };

    public static Option<int> Threads() => new("--threads", "-t")
    {
        Description = "Worker threads (0 = one per core)",
        DefaultValueFactory = _ => 0,
    };

    public static Option<string> Weights() => new Option<string>("--weights")
    {
        Description = "Hold the weights as stored, or quantize them to Q8_0 at load (blocks of 32 int8 with one fp32 scale)",
        DefaultValueFactory = _ => "stored",
    }.AcceptOnlyFromAmong("stored", "q8");

    public static MiniLlm.Engine.WeightFormat Format(string s) => s == "q8" ? MiniLlm.Engine.WeightFormat.Q8 : MiniLlm.Engine.WeightFormat.Stored;

    public static Option<string> Output() => new Option<string>("--output", "-o")
    {
        Description = "Output format",
        DefaultValueFactory = _ => "text",
    }.AcceptOnlyFromAmong("text", "json");
}
