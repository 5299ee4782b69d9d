using System.Text.Json;
using MiniLlm.Cli;
using MiniLlm.Engine;

namespace MiniLlm.Tests;

/// <summary>`minillm project` reproduces the figures engineers quote for GPUs.</summary>
public class ProjectionTests
{
    private static JsonElement Project(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        Assert.True(CliApp.Run(["project", .. args, "--output", "json"], o, e) == 0, e.ToString());
        return JsonDocument.Parse(o.ToString()).RootElement.Clone();
    }

    private static JsonElement Row(JsonElement p, int batch) => p.GetProperty("rows").EnumerateArray().Single(r => r.GetProperty("batch").GetInt32() == batch);

    [Fact]
    public void Llama2_70bFp16OnH100CapsNear24TokensPerSecond()
    {
        var p = Project("--config", "llama2-70b", "--hardware", "h100", "--dtype", "fp16", "--batch", "1");
        var r = Row(p, 1);
        Assert.InRange(r.GetProperty("decode_tok_s").GetDouble(), 24 * 0.95, 24 * 1.05);   // 138 GB ÷ 3.35 TB/s
        Assert.Equal("memory", r.GetProperty("bound").GetString());
        Assert.Equal(0, p.GetProperty("max_batch_by_kv").GetInt32());                      // 138 GB does not fit in 80 GB
    }

    [Fact]
    public void Llama2_7bFp16IsAbout4Point2MsPerToken()
    {
        var r = Row(Project("--config", "llama2-7b", "--hardware", "h100", "--dtype", "fp16", "--batch", "1"), 1);
        Assert.InRange(r.GetProperty("tpot_ms").GetDouble(), 4.2 * 0.95, 4.2 * 1.05);      // ≈ 13.5 GB ÷ 3.35 TB/s
    }

    [Fact]
    public void Llama3_8bBf16ReadsFifteenGigabytesPerToken()
    {
        var p = Project("--config", "llama3-8b", "--hardware", "h100", "--batch", "1,1024", "--prompt-tokens", "128", "--gen-tokens", "128");
        // 8.03 B parameters minus the 0.53 B-row embedding table that decode only gathers from: ≈ 15.0 GB → ≈ 4.5 ms
        Assert.InRange(Row(p, 1).GetProperty("tpot_ms").GetDouble(), 4.5 * 0.95, 4.5 * 1.05);
        Assert.Equal("compute", Row(p, 1024).GetProperty("bound").GetString());
        Assert.InRange(p.GetProperty("compute_bound_batch").GetInt32(), 400, 800);
        Assert.Equal(989.4 / 3.35, p.GetProperty("ridge_flop_per_byte").GetDouble(), 1);
    }

    [Fact]
    public void BandwidthEfficiencyScalesDecodeAndUserHardwareFilesWork()
    {
        var full = Row(Project("--config", "llama2-7b", "--batch", "1"), 1).GetProperty("tpot_ms").GetDouble();
        var eighty = Row(Project("--config", "llama2-7b", "--batch", "1", "--bandwidth-efficiency", "0.8"), 1).GetProperty("tpot_ms").GetDouble();
        Assert.Equal(full / 0.8, eighty, 6);
        var file = Path.Combine(TestPaths.NewTempDir("hw"), "mygpu.json");
        File.WriteAllText(file, "{\"name\":\"mygpu\",\"bf16_tflops\":100,\"bandwidth_tbps\":1.0,\"memory_gb\":48}");
        var mine = Project("--config", "llama2-7b", "--hardware", file, "--batch", "1");
        Assert.Equal("mygpu", mine.GetProperty("hardware").GetString());
        Assert.InRange(Row(mine, 1).GetProperty("tpot_ms").GetDouble(), full * 3.35 * 0.99, full * 3.35 * 1.01);
        var e = new StringWriter();
        Assert.NotEqual(0, CliApp.Run(["project", "--config", "llama2-7b", "--hardware", "tpu9"], new StringWriter(), e));
        Assert.Contains("tpu9", e.ToString());
        Assert.NotEqual(0, CliApp.Run(["project", "--config", "llama2-7b", "--hardware", "a100", "--dtype", "fp8"], new StringWriter(), new StringWriter()));
    }

    [Fact]
    public void ParameterCountsMatchThePublishedModels()
    {
        Assert.InRange(Projection.Parameters(KnownConfigs.Get("llama2-7b")) / 1e9, 6.73, 6.75);
        Assert.InRange(Projection.Parameters(KnownConfigs.Get("llama2-70b")) / 1e9, 68.9, 69.0);
        Assert.InRange(Projection.Parameters(KnownConfigs.Get("llama3-8b")) / 1e9, 8.02, 8.04);
        Assert.InRange(Projection.Parameters(KnownConfigs.Get("tinyllama-1.1b")) / 1e9, 1.09, 1.11);
    }
}
