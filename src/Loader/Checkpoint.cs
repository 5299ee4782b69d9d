using System.Text.Json;

namespace MiniLlm.Loader;

/// <summary>
/// All tensors of a model directory: one <c>model.safetensors</c>, or the shards that
/// <c>model.safetensors.index.json</c> names. Tensor names are unique across shards.
/// </summary>
public sealed class Checkpoint : IDisposable
{
    public const string SingleFile = "model.safetensors";
    public const string IndexFile = "model.safetensors.index.json";

    private readonly List<SafetensorsFile> _files;
    private readonly Dictionary<string, TensorView> _tensors;

    public string Directory { get; }
    public IReadOnlyList<SafetensorsFile> Files => _files;
    public IReadOnlyCollection<TensorView> Tensors => _tensors.Values;

    private Checkpoint(string dir, List<SafetensorsFile> files, Dictionary<string, TensorView> tensors)
    {
        Directory = dir; _files = files; _tensors = tensors;
    }

    public bool Contains(string name) => _tensors.ContainsKey(name);
    public bool TryGet(string name, out TensorView view) => _tensors.TryGetValue(name, out view);

    public static Checkpoint Open(string dir)
    {
        var index = Path.Combine(dir, IndexFile);
        var single = Path.Combine(dir, SingleFile);
        if (File.Exists(index)) return OpenSharded(dir, index);
        if (File.Exists(single)) return FromFiles(dir, [SafetensorsFile.Open(single)], null);
        throw new ModelFormatException($"{dir}: neither {SingleFile} nor {IndexFile} found");
    }

    private static Checkpoint OpenSharded(string dir, string indexPath)
    {
        Dictionary<string, string> weightMap;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(indexPath));
            if (!doc.RootElement.TryGetProperty("weight_map", out var wm) || wm.ValueKind != JsonValueKind.Object)
                throw new ModelFormatException($"{indexPath}: missing object 'weight_map'");
            weightMap = new Dictionary<string, string>();
            foreach (var p in wm.EnumerateObject())
            {
                if (p.Value.ValueKind != JsonValueKind.String)
                    throw new ModelFormatException($"{indexPath}: weight_map entry '{p.Name}' must name a file");
                if (!weightMap.TryAdd(p.Name, p.Value.GetString()!))
                    throw new ModelFormatException($"{indexPath}: tensor '{p.Name}' is listed twice");
            }
        }
        catch (JsonException e)
        {
            throw new ModelFormatException($"{indexPath}: not valid JSON ({e.Message})");
        }

        var files = new List<SafetensorsFile>();
        try
        {
            foreach (var shard in weightMap.Values.Distinct().Order(StringComparer.Ordinal))
            {
                if (shard.Contains('/') || shard.Contains('\\') || shard.Contains(".."))
                    throw new ModelFormatException($"{indexPath}: shard name '{shard}' must be a plain file name in the model directory");
                files.Add(SafetensorsFile.Open(Path.Combine(dir, shard)));
            }
            return FromFiles(dir, files, (weightMap, indexPath));
        }
        catch
        {
            foreach (var f in files) f.Dispose();
            throw;
        }
    }

    private static Checkpoint FromFiles(string dir, List<SafetensorsFile> files, (Dictionary<string, string> Map, string Path)? index)
    {
        var tensors = new Dictionary<string, TensorView>();
        foreach (var f in files)
            foreach (var t in f.Tensors)
            {
                if (!tensors.TryAdd(t.Name, t))
                    throw new ModelFormatException($"{f.Path}: tensor '{t.Name}' also appears in {tensors[t.Name].File}");
                if (index is { } ix && (!ix.Map.TryGetValue(t.Name, out var shard) || Path.GetFileName(f.Path) != shard))
                    throw new ModelFormatException($"{f.Path}: tensor '{t.Name}' is not mapped to this file by {ix.Path}");
            }
        if (index is { } idx)
            foreach (var (name, shard) in idx.Map)
                if (!tensors.ContainsKey(name))
                    throw new ModelFormatException($"{idx.Path}: tensor '{name}' is mapped to {shard} but that file does not hold it");
        return new Checkpoint(Path.GetFullPath(dir), files, tensors);
    }

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
    }
}
