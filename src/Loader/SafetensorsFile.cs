using System.IO.MemoryMappedFiles;
using System.Text.Json;

namespace MiniLlm.Loader;

/// <summary>
/// One memory-mapped .safetensors file: an 8-byte little-endian header length, a JSON header, then the
/// data section. The header is validated strictly before any tensor is exposed, so a view can never
/// reach past the mapped region.
/// </summary>
public sealed unsafe class SafetensorsFile : IDisposable
{
    /// <summary>Headers above this are refused (the reference implementation's limit).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly byte* _base;
    private readonly Dictionary<string, TensorView> _tensors;
    private bool _disposed;

    public string Path { get; }
    public long FileLength { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }
    /// <summary>Tensors in file order (by data offset).</summary>
    public IReadOnlyList<TensorView> Tensors { get; }

    private SafetensorsFile(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, byte* basePtr, long length,
        List<TensorView> tensors, Dictionary<string, string> metadata)
    {
        Path = path; _map = map; _view = view; _base = basePtr; FileLength = length;
        Tensors = tensors;
        _tensors = tensors.ToDictionary(t => t.Name);
        Metadata = metadata;
    }

    public bool Contains(string name) => _tensors.ContainsKey(name);

    public TensorView this[string name] => _tensors.TryGetValue(name, out var t)
        ? t
        : throw new ModelFormatException($"{Path}: no tensor named '{name}'");

    public bool TryGet(string name, out TensorView view) => _tensors.TryGetValue(name, out view);

    public static SafetensorsFile Open(string path)
    {
        var full = System.IO.Path.GetFullPath(path);
        if (!File.Exists(full)) throw new ModelFormatException($"{full}: file not found");
        long length = new FileInfo(full).Length;
        if (length < 8)
            throw new ModelFormatException($"{full}: truncated: {length} bytes, shorter than the 8-byte header length");

        var map = MemoryMappedFile.CreateFromFile(full, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        MemoryMappedViewAccessor? view = null;
        bool ok = false;
        try
        {
            view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            byte* p = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
            p += view.PointerOffset;
            var (tensors, metadata) = ParseHeader(full, p, length);
            var file = new SafetensorsFile(full, map, view, p, length, tensors, metadata);
            ok = true;
            return file;
        }
        finally
        {
            if (!ok)
            {
                if (view != null)
                {
                    view.SafeMemoryMappedViewHandle.ReleasePointer();
                    view.Dispose();
                }
                map.Dispose();
            }
        }
    }


    private static (List<TensorView>, Dictionary<string, string>) ParseHeader(string path, byte* p, long fileLength)
    {
        ulong headerLen = *(ulong*)p; // little-endian on every platform .NET runs MiniLlm on
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("big-endian hosts are not supported");
        if (headerLen > MaxHeaderBytes)
            throw new ModelFormatException($"{path}: header length {headerLen} bytes exceeds the {MaxHeaderBytes}-byte limit (corrupt or not a safetensors file)");
        if (8 + (long)headerLen > fileLength)
            throw new ModelFormatException($"{path}: header length {headerLen} bytes runs past the end of the file ({fileLength} bytes); the file is truncated or not safetensors");

        long dataStart = 8 + (long)headerLen;
        long dataLength = fileLength - dataStart;
        var headerBytes = new ReadOnlySpan<byte>(p + 8, (int)headerLen);

        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(headerBytes.ToArray(), new JsonDocumentOptions { MaxDepth = 16 });
        }
        catch (JsonException e)
        {
            throw new ModelFormatException($"{path}: header is not valid JSON ({e.Message})");
        }

        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new ModelFormatException($"{path}: header JSON must be an object, found {doc.RootElement.ValueKind}");

            var metadata = new Dictionary<string, string>();
            var seen = new HashSet<string>();
            var entries = new List<(string Name, DType DType, long[] Shape, long Begin, long End)>();
            foreach (var prop in doc.RootElement.EnumerateObject())
            {
                if (!seen.Add(prop.Name))
                    throw new ModelFormatException($"{path}: tensor '{prop.Name}' appears twice in the header");
                if (prop.Name == "__metadata__")
                {
                    if (prop.Value.ValueKind != JsonValueKind.Object)
                        throw new ModelFormatException($"{path}: __metadata__ must be an object of strings");
                    foreach (var m in prop.Value.EnumerateObject())
                        metadata[m.Name] = m.Value.ValueKind == JsonValueKind.String ? m.Value.GetString()! : m.Value.GetRawText();
                    continue;
                }
                entries.Add(ParseEntry(path, prop.Name, prop.Value, dataLength));
            }

            // Offsets must tile the data section exactly: no overlap, no hole, nothing left over.
            entries.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
            long expected = 0;
            string? previous = null;
            foreach (var e in entries)
            {
                if (e.Begin < expected)
                    throw new ModelFormatException($"{path}: tensor '{e.Name}' data_offsets [{e.Begin}, {e.End}] overlap tensor '{previous}' (which ends at {expected})");
                if (e.Begin > expected)
                    throw new ModelFormatException($"{path}: tensor '{e.Name}' data_offsets [{e.Begin}, {e.End}] leave a hole of {e.Begin - expected} bytes after {(previous == null ? "the start of the data" : $"tensor '{previous}'")}");
                expected = e.End;
                previous = e.Name;
            }
            if (expected != dataLength)
                throw new ModelFormatException($"{path}: the tensors cover {expected} bytes but the data section holds {dataLength} (trailing bytes or a truncated file)");

            var views = new List<TensorView>(entries.Count);
            foreach (var e in entries)
                views.Add(new TensorView(e.Name, e.DType, e.Shape, (nint)(p + dataStart + e.Begin), e.End - e.Begin, path));
            return (views, metadata);
        }
    }

    private static (string, DType, long[], long, long) ParseEntry(string path, string name, JsonElement v, long dataLength)
    {
        string where = $"{path}: tensor '{name}'";
        if (v.ValueKind != JsonValueKind.Object) throw new ModelFormatException($"{where}: entry must be an object");
        if (!v.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String)
            throw new ModelFormatException($"{where}: missing string field 'dtype'");
        string dtypeText = dt.GetString()!;
        if (!DTypes.TryParse(dtypeText, out var dtype))
        {
            if (DTypes.KnownButUnsupported.Contains(dtypeText))
                throw new ModelFormatException($"{where}: dtype {dtypeText} is not supported (MiniLlm reads F32, F16 and BF16)");
            throw new ModelFormatException($"{where}: unknown dtype '{dtypeText}'");
        }
        if (!v.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array)
            throw new ModelFormatException($"{where}: missing array field 'shape'");
        var shape = new long[sh.GetArrayLength()];
        int i = 0;
        long count = 1;
        foreach (var d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long n) || n < 0)
                throw new ModelFormatException($"{where}: shape entries must be non-negative integers");
            shape[i++] = n;
            count = n == 0 ? 0 : (count > long.MaxValue / n ? throw new ModelFormatException($"{where}: shape {sh.GetRawText()} overflows") : count * n);
        }
        if (!v.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
            throw new ModelFormatException($"{where}: 'data_offsets' must be an array [begin, end]");
        var o0 = off[0];
        var o1 = off[1];
        if (o0.ValueKind != JsonValueKind.Number || o1.ValueKind != JsonValueKind.Number ||
            !o0.TryGetInt64(out long begin) || !o1.TryGetInt64(out long end) || begin < 0 || end < begin)
            throw new ModelFormatException($"{where}: invalid data_offsets {off.GetRawText()}");
        if (end > dataLength)
            throw new ModelFormatException($"{where}: data_offsets [{begin}, {end}] out of range: the data section holds {dataLength} bytes");
        long bytes = count * DTypes.SizeOf(dtype);
        if (end - begin != bytes)
            throw new ModelFormatException($"{where}: data_offsets span {end - begin} bytes but shape {sh.GetRawText()} of {dtypeText} needs {bytes}");
        return (name, dtype, shape, begin, end);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _map.Dispose();
    }
}
