using System.Text;
using MiniLlm.Loader;

namespace MiniLlm.Tests;

public class SafetensorsTests
{
    private static string NewFile() => Path.Combine(TestPaths.NewTempDir("st"), "model.safetensors");

    private static ModelFormatException Fails(string path)
    {
        var e = Assert.Throws<ModelFormatException>(() => { using var f = SafetensorsFile.Open(path); });
        Assert.Contains(Path.GetFileName(path), e.Message);
        Assert.DoesNotContain("\n", e.Message);
        return e;
    }

    [Fact]
    public void ReadsEveryDtypeZeroCopyWithMetadata()
    {
        var path = NewFile();
        float[] vals = [1.5f, -2.25f, 0.125f, 3f, 65504f, -0.0f];
        TestSafetensors.Write(path,
        [
            TestSafetensors.Typed("a.f32", [2, 3], vals, "F32"),
            TestSafetensors.Typed("b.bf16", [6], vals, "BF16"),
            TestSafetensors.Typed("c.f16", [3, 2], vals, "F16"),
            TestSafetensors.F32("empty", [0, 4], []),
        ], new Dictionary<string, string> { ["format"] = "pt" });
        using var f = SafetensorsFile.Open(path);
        Assert.Equal("pt", f.Metadata["format"]);
        Assert.Equal(4, f.Tensors.Count);
        Assert.Equal(DType.F32, f["a.f32"].DType);
        Assert.Equal(DType.BF16, f["b.bf16"].DType);
        Assert.Equal(DType.F16, f["c.f16"].DType);
        Assert.Equal([2L, 3L], f["a.f32"].Shape);
        for (int i = 0; i < vals.Length; i++)
        {
            Assert.Equal(vals[i], f["a.f32"].GetFloat(i));
            Assert.Equal(TestSafetensors.RoundTo(vals[i], "BF16"), f["b.bf16"].GetFloat(i));
            Assert.Equal(TestSafetensors.RoundTo(vals[i], "F16"), f["c.f16"].GetFloat(i));
        }
        Assert.Equal(0, f["empty"].ElementCount);
    }

    [Fact]
    public void TruncatedFile()
    {
        var path = NewFile();
        File.WriteAllBytes(path, [1, 2, 3]);
        Assert.Contains("truncated", Fails(path).Message);
    }

    [Fact]
    public void TruncatedData()
    {
        var path = NewFile();
        TestSafetensors.Write(path, [TestSafetensors.F32("w", [4], [1, 2, 3, 4])]);
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..^4]);
        var e = Fails(path);
        Assert.Contains("'w'", e.Message);
        Assert.Contains("out of range", e.Message);
    }

    [Fact]
    public void HeaderLengthPastEndOfFile()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{}", [], headerLengthOverride: 4096);
        Assert.Contains("past the end", Fails(path).Message);
    }

    [Fact]
    public void HeaderLengthOverLimit()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{}", [], headerLengthOverride: 200_000_000);
        Assert.Contains("limit", Fails(path).Message);
    }

    [Fact]
    public void GarbageJson()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{\"w\": {\"dtype\": \"F32\", oops", []);
        Assert.Contains("not valid JSON", Fails(path).Message);
    }

    [Fact]
    public void HeaderNotAnObject()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "[1,2,3]", []);
        Assert.Contains("object", Fails(path).Message);
    }

    [Fact]
    public void OffsetsOutOfRange()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8000]}}", new byte[8]);
        var e = Fails(path);
        Assert.Contains("'w'", e.Message);
        Assert.Contains("out of range", e.Message);
    }

    [Fact]
    public void OverlappingOffsets()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path,
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", new byte[12]);
        Assert.Contains("overlap", Fails(path).Message);
    }

    [Fact]
    public void HoleBetweenTensors()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path,
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", new byte[12]);
        Assert.Contains("hole", Fails(path).Message);
    }

    [Fact]
    public void TrailingBytesAfterLastTensor()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", new byte[12]);
        Assert.Contains("trailing", Fails(path).Message);
    }

    [Fact]
    public void UnsupportedDtypeI64()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{\"ids\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}", new byte[16]);
        var e = Fails(path);
        Assert.Contains("'ids'", e.Message);
        Assert.Contains("I64", e.Message);
        Assert.Contains("not supported", e.Message);
    }

    [Fact]
    public void UnknownDtype()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{\"x\":{\"dtype\":\"Q7\",\"shape\":[2],\"data_offsets\":[0,2]}}", new byte[2]);
        Assert.Contains("unknown dtype", Fails(path).Message);
    }

    [Fact]
    public void ByteCountDisagreesWithShape()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", new byte[8]);
        var e = Fails(path);
        Assert.Contains("'w'", e.Message);
        Assert.Contains("needs 12", e.Message);
    }

    [Fact]
    public void DuplicateNames()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path,
            "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", new byte[8]);
        Assert.Contains("twice", Fails(path).Message);
    }

    [Fact]
    public void NegativeOrMalformedShape()
    {
        var path = NewFile();
        TestSafetensors.WriteRaw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", new byte[4]);
        Assert.Contains("non-negative", Fails(path).Message);
    }

    [Fact]
    public void ShardedCheckpointThroughIndex()
    {
        var dir = TestPaths.NewTempDir("shards");
        TestSafetensors.Write(Path.Combine(dir, "model-00001-of-00002.safetensors"), [TestSafetensors.F32("a", [2], [1, 2])]);
        TestSafetensors.Write(Path.Combine(dir, "model-00002-of-00002.safetensors"), [TestSafetensors.F32("b", [1], [3])]);
        File.WriteAllText(Path.Combine(dir, Checkpoint.IndexFile),
            "{\"metadata\":{},\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00002-of-00002.safetensors\"}}");
        using var ck = Checkpoint.Open(dir);
        Assert.True(ck.TryGet("a", out var a));
        Assert.True(ck.TryGet("b", out var b));
        Assert.Equal(2f, a.GetFloat(1));
        Assert.Equal(3f, b.GetFloat(0));
    }

    [Fact]
    public void ShardIndexNamingAMissingTensor()
    {
        var dir = TestPaths.NewTempDir("shards-bad");
        TestSafetensors.Write(Path.Combine(dir, "s1.safetensors"), [TestSafetensors.F32("a", [1], [1])]);
        File.WriteAllText(Path.Combine(dir, Checkpoint.IndexFile), "{\"weight_map\":{\"a\":\"s1.safetensors\",\"zzz\":\"s1.safetensors\"}}");
        var e = Assert.Throws<ModelFormatException>(() => Checkpoint.Open(dir));
        Assert.Contains("'zzz'", e.Message);
    }

    [Fact]
    public void TheRealModelLoads()
    {
        using var f = SafetensorsFile.Open(Path.Combine(TestPaths.Model("tiny-kjv"), "model.safetensors"));
        Assert.Contains(f.Tensors, t => t.Name == "model.embed_tokens.weight");
        Assert.All(f.Tensors, t => Assert.Equal(DType.F32, t.DType));
    }
}
