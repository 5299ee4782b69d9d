namespace MiniLlm.Tests;

/// <summary>Where the repository and ../shared are. Missing shared files fail tests loudly rather than skip them.</summary>
public static class TestPaths
{
    public static string RepoRoot { get; } = FindRepoRoot();

    public static string Shared => Existing(Path.GetFullPath(Path.Combine(RepoRoot, "..", "shared")));
    public static string Model(string name) => Existing(Path.Combine(Shared, "models", name));
    public static string Llama2Tokenizer => Existing(Path.Combine(Shared, "tokenizers", "llama2"));

    public static string NewTempDir(string tag)
    {
        var d = Path.Combine(Path.GetTempPath(), "minillm-tests", $"{tag}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(d);
        return d;
    }

    private static string Existing(string p) =>
        Directory.Exists(p) ? p : throw new DirectoryNotFoundException($"test data not found at {p} (the project expects ../shared beside the checkout)");

    private static string FindRepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "MiniLlm.sln"))) return d.FullName;
        throw new InvalidOperationException("MiniLlm.sln not found above " + AppContext.BaseDirectory);
    }
}
