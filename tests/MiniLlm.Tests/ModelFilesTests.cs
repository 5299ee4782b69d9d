using System.Text.Json;
using System.Text.Json.Nodes;
using MiniLlm.Loader;

namespace MiniLlm.Tests;

public class ModelFilesTests
{
    private static RandomModel Small(string tag, bool tied = false) =>
        new(new RandomModelSpec { Hidden = 8, Intermediate = 12, Heads = 2, KvHeads = 1, HeadDim = 4, Vocab = 11, Layers = 2, Tied = tied }, TestPaths.NewTempDir(tag));

    private static void RewriteWithout(RandomModel m, string drop, (string Name, long[] Shape)? replace = null, (string Name, long[] Shape)? extra = null)
    {
        var entries = m.Tensors.Where(kv => kv.Key != drop).Select(kv => TestSafetensors.F32(kv.Key, kv.Value.Shape, kv.Value.Values)).ToList();
        if (replace is var (rn, rs))
        {
            entries.RemoveAll(e => e.Name == rn);
            entries.Add(TestSafetensors.F32(rn, rs, new float[rs.Aggregate(1L, (a, b) => a * b)]));
        }
        if (extra is var (en, es)) entries.Add(TestSafetensors.F32(en, es, new float[es.Aggregate(1L, (a, b) => a * b)]));
        TestSafetensors.Write(Path.Combine(m.Dir, "model.safetensors"), entries);
    }

    [Fact]
    public void OpensAValidModel()
    {
        var m = Small("valid");
        using var f = ModelFiles.Open(m.Dir, requireTokenizer: false);
        Assert.Equal(2, f.Weights.Layers.Count);
        Assert.Null(f.Tokenizer);
    }

    [Fact]
    public void MissingTensorIsNamed()
    {
        var m = Small("missing");
        RewriteWithout(m, "model.layers.1.mlp.up_proj.weight");
        var e = Assert.Throws<ModelFormatException>(() => ModelFiles.Open(m.Dir, requireTokenizer: false));
        Assert.Contains("model.layers.1.mlp.up_proj.weight", e.Message);
        Assert.Contains("missing", e.Message);
    }

    [Fact]
    public void WrongShapeIsNamed()
    {
        var m = Small("shape");
        RewriteWithout(m, "", replace: ("model.layers.0.self_attn.k_proj.weight", [8, 8]));
        var e = Assert.Throws<ModelFormatException>(() => ModelFiles.Open(m.Dir, requireTokenizer: false));
        Assert.Contains("model.layers.0.self_attn.k_proj.weight", e.Message);
        Assert.Contains("[8, 8]", e.Message);
        Assert.Contains("[4, 8]", e.Message);
    }

    [Fact]
    public void UnexpectedTensorIsNamed()
    {
        var m = Small("extra");
        RewriteWithout(m, "", extra: ("model.layers.7.mlp.up_proj.weight", [2]));
        var e = Assert.Throws<ModelFormatException>(() => ModelFiles.Open(m.Dir, requireTokenizer: false));
        Assert.Contains("unexpected tensor 'model.layers.7.mlp.up_proj.weight'", e.Message);
    }

    [Fact]
    public void UntiedModelWithoutLmHeadFails()
    {
        var m = Small("nohead");
        RewriteWithout(m, "lm_head.weight");
        var e = Assert.Throws<ModelFormatException>(() => ModelFiles.Open(m.Dir, requireTokenizer: false));
        Assert.Contains("lm_head.weight", e.Message);
    }

    private static string WriteConfig(Action<JsonObject> edit)
    {
        var dir = TestPaths.NewTempDir("cfg");
        var node = JsonNode.Parse(RandomModel.ConfigJson(new RandomModelSpec()))!.AsObject();
        edit(node);
        var path = Path.Combine(dir, "config.json");
        File.WriteAllText(path, node.ToJsonString());
        return path;
    }

    [Theory]
    [InlineData("hidden_size")]
    [InlineData("num_hidden_layers")]
    [InlineData("vocab_size")]
    [InlineData("max_position_embeddings")]
    public void ConfigWithoutRequiredField(string field)
    {
        var path = WriteConfig(c => c.Remove(field));
        var e = Assert.Throws<ModelFormatException>(() => LlamaConfig.Load(path));
        Assert.Contains($"'{field}'", e.Message);
        Assert.Contains("config.json", e.Message);
    }

    [Fact]
    public void ConfigDefaultsAndEosList()
    {
        var path = WriteConfig(c =>
        {
            c.Remove("num_key_value_heads");
            c.Remove("head_dim");
            c["hidden_size"] = 48;
            c["num_attention_heads"] = 6;
            c["eos_token_id"] = new JsonArray(2, 7);
        });
        var cfg = LlamaConfig.Load(path);
        Assert.Equal(6, cfg.NumKeyValueHeads);
        Assert.Equal(8, cfg.HeadDim);
        Assert.Equal([2, 7], cfg.EosTokenIds);
    }

    [Fact]
    public void Llama3RopeScalingIsReadAndOthersRejected()
    {
        var ok = WriteConfig(c => c["rope_scaling"] = JsonNode.Parse("{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}"));
        Assert.Equal(8.0, LlamaConfig.Load(ok).RopeScaling!.Factor);
        var bad = WriteConfig(c => c["rope_scaling"] = JsonNode.Parse("{\"type\":\"linear\",\"factor\":2.0}"));
        var e = Assert.Throws<ModelFormatException>(() => LlamaConfig.Load(bad));
        Assert.Contains("'linear'", e.Message);
    }

    [Fact]
    public void ConfigWithBadValues()
    {
        Assert.Contains("multiple", Assert.Throws<ModelFormatException>(() => LlamaConfig.Load(WriteConfig(c => c["num_key_value_heads"] = 4))).Message);
        Assert.Contains("'hidden_size'", Assert.Throws<ModelFormatException>(() => LlamaConfig.Load(WriteConfig(c => c["hidden_size"] = "big"))).Message);
        Assert.Contains("model_type", Assert.Throws<ModelFormatException>(() => LlamaConfig.Load(WriteConfig(c => c["model_type"] = "gpt2"))).Message);
        var dir = TestPaths.NewTempDir("cfg-json");
        File.WriteAllText(Path.Combine(dir, "config.json"), "{ nope");
        Assert.Contains("not valid JSON", Assert.Throws<ModelFormatException>(() => LlamaConfig.Load(Path.Combine(dir, "config.json"))).Message);
    }

    [Fact]
    public void ModelLocatorSaysWhereItLooked()
    {
        var e = Assert.Throws<ModelNotFoundException>(() => ModelLocator.Resolve("no-such-model-xyz"));
        Assert.Contains("no-such-model-xyz", e.Message);
        Assert.Contains("models", e.Message);
        Assert.Contains("README", e.Message);
    }

    [Fact]
    public void ModelLocatorFindsByPathNameAndEnvironment()
    {
        Assert.Equal(Path.GetFullPath(TestPaths.Model("tiny-kjv")), ModelLocator.Resolve(TestPaths.Model("tiny-kjv")));
        Assert.Equal(Path.GetFullPath(TestPaths.Model("tiny-kjv")), Path.GetFullPath(ModelLocator.Resolve("tiny-kjv")));
        var m = Small("envmodel");
        var old = Environment.GetEnvironmentVariable(ModelLocator.EnvVar);
        try
        {
            Environment.SetEnvironmentVariable(ModelLocator.EnvVar, Path.GetDirectoryName(m.Dir));
            Assert.Equal(m.Dir, ModelLocator.Resolve(Path.GetFileName(m.Dir)));
        }
        finally { Environment.SetEnvironmentVariable(ModelLocator.EnvVar, old); }
    }
}
