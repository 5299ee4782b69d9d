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

    public static Option<string> Output() => new Option<string>("--output", "-o")
    {
        Description = "Output format",
        DefaultValueFactory = _ => "text",
    }.AcceptOnlyFromAmong("text", "json");
}
