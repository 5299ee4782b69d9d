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

/// <summary>The simplest cache: for each layer, K and V as consecutive 16-position tiles, enough for the capacity.</summary>
public sealed unsafe class ContiguousKvCache : IKvCache
{
    private readonly NativeBuffer[] _k, _v;
    private readonly int _rowStride;

    public int Capacity { get; }
    public long Bytes => 2L * _k.Length * Capacity * _rowStride * sizeof(float);

    public ContiguousKvCache(int layers, int kvDim, int capacity)
    {
        Capacity = capacity;
        _rowStride = kvDim;
        _k = new NativeBuffer[layers];
        _v = new NativeBuffer[layers];
        long floats = (long)(capacity + KvView.Tile - 1) / KvView.Tile * KvView.Tile * kvDim;
        for (int l = 0; l < layers; l++)
        {
            _k[l] = new NativeBuffer(floats);
            _v[l] = new NativeBuffer(floats);
        }
    }

    public KvView Layer(int layer) => new(_k[layer].Pointer, _v[layer].Pointer, _rowStride);

    public void Dispose()
    {
        foreach (var b in _k) b.Dispose();
        foreach (var b in _v) b.Dispose();
    }
}
