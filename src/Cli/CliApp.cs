using System.CommandLine;
using MiniLlm.Engine;
using MiniLlm.Loader;

namespace MiniLlm.Cli;

/// <summary>Exit codes of <c>minillm</c>.</summary>
public static class ExitCodes
{
    public const int Ok = 0;
    public const int Failure = 1;
    public const int BadArguments = 2;
    public const int BadModel = 3;
}

/// <summary>The <c>minillm</c> command tree. Output goes to the writers given, so tests can run it in-process.</summary>
public static class CliApp
{
    public static readonly Option<bool> Verbose = new("--verbose") { Description = "Show full exception details on errors", Recursive = true };

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var root = new RootCommand("MiniLlm: a CPU inference engine for small Llama models that explains its own speed.");
        root.Options.Add(Verbose);
        var io = new CliIO(stdout, stderr);
        root.Subcommands.Add(GenerateCommand.Create(io));
        root.Subcommands.Add(InfoCommand.Create(io));
        root.Subcommands.Add(RooflineCommand.Create(io));
        root.Subcommands.Add(SynthCommand.Create(io));
        root.Subcommands.Add(BenchCommand.Create(io));
        root.Subcommands.Add(BatchCommand.Create(io));
        root.Subcommands.Add(ProjectCommand.Create(io));
        root.Subcommands.Add(ProfileCommand.Create(io));
        root.Subcommands.Add(PerplexityCommand.Create(io));
        root.Subcommands.Add(QuantizeCommand.Create(io));
        var config = new InvocationConfiguration { Output = stdout, Error = stderr, EnableDefaultExceptionHandler = false };
        var parsed = root.Parse(args);
        try
        {
            return parsed.Invoke(config);
        }
        catch (Exception e)
        {
            return Report(e, parsed.GetValue(Verbose), stderr);
        }
    }

    /// <summary>One line naming the culprit; the stack trace only with --verbose.</summary>
    public static int Report(Exception e, bool verbose, TextWriter stderr)
    {
        while (e is AggregateException { InnerExceptions.Count: 1 } a) e = a.InnerException!;
        string message = e is ArgumentException { ParamName: { } name } ? e.Message.Replace($" (Parameter '{name}')", "") : e.Message;
        stderr.WriteLine($"error: {message}");
        if (verbose) stderr.WriteLine(e.ToString());
        return e switch
        {
            ArgumentException or PromptTooLongException or RequestRejectedException => ExitCodes.BadArguments,
            ModelFormatException or ModelNotFoundException => ExitCodes.BadModel,
            _ => ExitCodes.Failure,
        };
    }
}

public sealed record CliIO(TextWriter Out, TextWriter Err);
