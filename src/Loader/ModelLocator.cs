namespace MiniLlm.Loader;

/// <summary>
/// Finds a model directory: an explicit path, else a name under <c>$MINILLM_MODELS</c>, <c>models/</c> and
/// <c>../shared/models/</c> (each relative to the working directory and to the repository the program runs from).
/// </summary>
public static class ModelLocator
{
    public const string DefaultModel = "tiny-kjv";
    public const string EnvVar = "MINILLM_MODELS";

    public static string Resolve(string? pathOrName)
    {
        string name = string.IsNullOrWhiteSpace(pathOrName) ? DefaultModel : pathOrName;
        var looked = new List<string>();

        // 1. An explicit path: a model directory, or its config.json.
        string asGiven = Path.GetFullPath(name);
        if (File.Exists(asGiven) && Path.GetFileName(asGiven) == "config.json") return Path.GetDirectoryName(asGiven)!;
        if (IsModelDir(asGiven)) return asGiven;
        looked.Add(asGiven);

        // 2. A name under the search roots.
        foreach (var root in SearchRoots())
        {
            var candidate = Path.GetFullPath(Path.Combine(root, name));
            if (looked.Contains(candidate)) continue;
            if (IsModelDir(candidate)) return candidate;
            looked.Add(candidate);
        }
        throw new ModelNotFoundException(
            $"model '{name}' not found; looked in: {string.Join(", ", looked)}. " +
            $"Pass --model with a directory holding config.json, model.safetensors and tokenizer.model, set ${EnvVar}, " +
            "or see models/README.md for how to get one.");
    }

    public static IEnumerable<string> SearchRoots()
    {
        var env = Environment.GetEnvironmentVariable(EnvVar);
        if (!string.IsNullOrWhiteSpace(env))
            foreach (var p in env.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)) yield return p;
        var bases = new List<string> { Directory.GetCurrentDirectory() };
        if (FindRepoRoot(AppContext.BaseDirectory) is { } repo && !bases.Contains(repo)) bases.Add(repo);
        foreach (var b in bases)
        {
            yield return Path.Combine(b, "models");
            yield return Path.Combine(b, "..", "shared", "models");
        }
    }

    /// <summary>A file under ../shared (beside the working directory or the repository), or null.</summary>
    public static string? FindShared(string relative)
    {
        var bases = new List<string> { Directory.GetCurrentDirectory() };
        if (FindRepoRoot(AppContext.BaseDirectory) is { } repo) bases.Add(repo);
        foreach (var b in bases)
        {
            var p = Path.GetFullPath(Path.Combine(b, "..", "shared", relative));
            if (File.Exists(p)) return p;
        }
        return null;
    }

    /// <summary>The nearest directory at or above <paramref name="start"/> that holds MiniLlm.sln.</summary>
    public static string? FindRepoRoot(string start)
    {
        for (var d = new DirectoryInfo(start); d != null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "MiniLlm.sln"))) return d.FullName;
        return null;
    }

    private static bool IsModelDir(string dir) => File.Exists(Path.Combine(dir, "config.json"));
}
