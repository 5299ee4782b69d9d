using System.Text;
using System.Text.Json;

namespace MiniLlm.Tests;

/// <summary>A test-side safetensors writer, independent of src/, that can also write deliberately broken files.</summary>
public static class TestSafetensors
{
    public sealed record Entry(string Name, string DType, long[] Shape, byte[] Data);

    public static Entry F32(string name, long[] shape, float[] values) =>
        new(name, "F32", shape, values.SelectMany(BitConverter.GetBytes).ToArray());

    public static Entry Typed(string name, long[] shape, float[] values, string dtype) => dtype switch
    {
        "F32" => F32(name, shape, values),
        "BF16" => new(name, "BF16", shape, values.SelectMany(v => BitConverter.GetBytes(ToBf16(v))).ToArray()),
        "F16" => new(name, "F16", shape, values.SelectMany(v => BitConverter.GetBytes(BitConverter.HalfToUInt16Bits((Half)v))).ToArray()),
        _ => throw new ArgumentException(dtype),
    };

    /// <summary>fp32 → bf16 with round-to-nearest-even (what torch's .to(bfloat16) does).</summary>
    public static ushort ToBf16(float f)
    {
        uint u = BitConverter.SingleToUInt32Bits(f);
        if (float.IsNaN(f)) return 0x7fc0;
        uint rounding = 0x7fff + ((u >> 16) & 1);
        return (ushort)((u + rounding) >> 16);
    }

    public static float FromBf16(ushort b) => BitConverter.UInt32BitsToSingle((uint)b << 16);

    /// <summary>The value a weight has after being stored as <paramref name="dtype"/>.</summary>
    public static float RoundTo(float v, string dtype) => dtype switch
    {
        "F32" => v,
        "BF16" => FromBf16(ToBf16(v)),
        "F16" => (float)(Half)v,
        _ => throw new ArgumentException(dtype),
    };

    /// <summary>Header JSON text with offsets laid out back to back.</summary>
    public static string Header(IEnumerable<Entry> entries, IDictionary<string, string>? metadata = null)
    {
        var sb = new StringBuilder("{");
        if (metadata != null) sb.Append("\"__metadata__\":").Append(JsonSerializer.Serialize(metadata)).Append(',');
        long off = 0;
        bool first = true;
        foreach (var e in entries)
        {
            if (!first) sb.Append(',');
            first = false;
            sb.Append(JsonSerializer.Serialize(e.Name)).Append(":{\"dtype\":\"").Append(e.DType).Append("\",\"shape\":[")
              .Append(string.Join(",", e.Shape)).Append("],\"data_offsets\":[").Append(off).Append(',').Append(off + e.Data.Length).Append("]}");
            off += e.Data.Length;
        }
        return sb.Append('}').ToString();
    }

    public static void Write(string path, IEnumerable<Entry> entries, IDictionary<string, string>? metadata = null)
    {
        var list = entries.ToList();
        WriteRaw(path, Header(list, metadata), list.SelectMany(e => e.Data).ToArray());
    }

    /// <summary>8-byte length, header padded with spaces to a multiple of 8 (as the reference writer does), data.</summary>
    public static void WriteRaw(string path, string headerJson, byte[] data, ulong? headerLengthOverride = null)
    {
        var h = Encoding.UTF8.GetBytes(headerJson);
        int padded = (h.Length + 7) / 8 * 8;
        var header = new byte[padded];
        Array.Fill(header, (byte)' ');
        h.CopyTo(header, 0);
        using var f = File.Create(path);
        f.Write(BitConverter.GetBytes(headerLengthOverride ?? (ulong)padded));
        f.Write(header);
        f.Write(data);
    }
}
