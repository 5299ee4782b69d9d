using System.Text;
using System.Text.Json;

namespace MiniLlm.Loader;

/// <summary>Writes a .safetensors file tensor by tensor, streaming, so models larger than memory can be made.</summary>
public static class SafetensorsWriter
{
    public sealed record TensorSpec(string Name, DType DType, long[] Shape)
    {
        public long ByteLength => Shape.Aggregate(1L, (a, b) => a * b) * DTypes.SizeOf(DType);
    }

    /// <param name="writeData">Writes exactly <see cref="TensorSpec.ByteLength"/> bytes of the tensor to the stream.</param>
    public static void Write(string path, IReadOnlyList<TensorSpec> tensors, Action<TensorSpec, Stream> writeData,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var buffer = new MemoryStream();
        using (var j = new Utf8JsonWriter(buffer))
        {
            j.WriteStartObject();
            if (metadata != null)
            {
                j.WriteStartObject("__metadata__");
                foreach (var (k, v) in metadata) j.WriteString(k, v);
                j.WriteEndObject();
            }
            long offset = 0;
            foreach (var t in tensors)
            {
                j.WriteStartObject(t.Name);
                j.WriteString("dtype", DTypes.Name(t.DType));
                j.WriteStartArray("shape");
                foreach (var d in t.Shape) j.WriteNumberValue(d);
                j.WriteEndArray();
                j.WriteStartArray("data_offsets");
                j.WriteNumberValue(offset);
                j.WriteNumberValue(offset + t.ByteLength);
                j.WriteEndArray();
                j.WriteEndObject();
                offset += t.ByteLength;
            }
            j.WriteEndObject();
        }
        // Pad the header with spaces to a multiple of 8 so the data section starts aligned.
        var header = buffer.ToArray();
        int padded = (header.Length + 7) / 8 * 8;
        using var f = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
        f.Write(BitConverter.GetBytes((ulong)padded));
        f.Write(header);
        for (int i = header.Length; i < padded; i++) f.WriteByte((byte)' ');
        foreach (var t in tensors)
        {
            long before = f.Position;
            writeData(t, f);
            if (f.Position - before != t.ByteLength)
                throw new InvalidOperationException($"{path}: tensor '{t.Name}' wrote {f.Position - before} bytes, expected {t.ByteLength}");
        }
    }

    /// <summary>fp32 → the stored bytes of <paramref name="dtype"/> (bf16 rounds to nearest even).</summary>
    public static void Encode(ReadOnlySpan<float> src, DType dtype, Span<byte> dst)
    {
        switch (dtype)
        {
            case DType.F32:
                for (int i = 0; i < src.Length; i++) BitConverter.TryWriteBytes(dst[(i * 4)..], src[i]);
                break;
            case DType.BF16:
                for (int i = 0; i < src.Length; i++) BitConverter.TryWriteBytes(dst[(i * 2)..], ToBf16(src[i]));
                break;
            case DType.F16:
                for (int i = 0; i < src.Length; i++) BitConverter.TryWriteBytes(dst[(i * 2)..], BitConverter.HalfToUInt16Bits((Half)src[i]));
                break;
            default:
                throw new ArgumentException($"cannot encode floats as {DTypes.Name(dtype)}", nameof(dtype));
        }
    }

    public static ushort ToBf16(float f)
    {
        if (float.IsNaN(f)) return 0x7fc0;
        uint u = BitConverter.SingleToUInt32Bits(f);
        return (ushort)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }
}
