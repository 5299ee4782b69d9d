using MiniLlm.Kernels;

namespace MiniLlm.Engine;

/// <summary>
/// Keys and values of one sequence, per layer, for positions 0..Capacity−1. The forward pass writes the rows of
/// new tokens and attention reads them, both through <see cref="Layer"/>'s view, so a paged cache only has to hand
/// out a view with a block table.
/// </summary>
public interface IKvCache : IDisposable
{
    /// <summary>Positions this cache can hold.</summary>
    int Capacity { get; }
    KvView Layer(int layer);
}

/// <summary>
/// The simplest cache: for each layer, K and V as consecutive 16-position tiles, enough for the capacity, in fp32
/// or bf16 (<see cref="KvType"/>).
/// </summary>
public sealed unsafe class ContiguousKvCache : IKvCache
{
    private readonly NativeBuffer[] _k, _v;
    private readonly int _rowStride;

    public int Capacity { get; }
    public KvType Type { get; }
    public long Bytes => 2L * _k.Length * Capacity * _rowStride * KvView.SizeOf(Type);

    public ContiguousKvCache(int layers, int kvDim, int capacity, KvType type = KvType.F32)
    {
        Capacity = capacity;
        Type = type;
        _rowStride = kvDim;
        _k = new NativeBuffer[layers];
        _v = new NativeBuffer[layers];
        long elements = (long)(capacity + KvView.Tile - 1) / KvView.Tile * KvView.Tile * kvDim;
        long floats = (elements * KvView.SizeOf(type) + sizeof(float) - 1) / sizeof(float);
        for (int l = 0; l < layers; l++)
        {
            _k[l] = new NativeBuffer(floats);
            _v[l] = new NativeBuffer(floats);
        }
    }

    public KvView Layer(int layer) => new((byte*)_k[layer].Pointer, (byte*)_v[layer].Pointer, _rowStride, Type);

    public void Dispose()
    {
        foreach (var b in _k) b.Dispose();
        foreach (var b in _v) b.Dispose();
    }
}
