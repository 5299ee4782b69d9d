using System.IO.Hashing;
using System.Runtime.InteropServices;
using MiniLlm.Kernels;

namespace MiniLlm.Engine;

/// <summary>
/// The KV memory of the whole engine: for each layer a K pool and a V pool of <see cref="Blocks"/> blocks of
/// <see cref="BlockSize"/> positions (one <see cref="KvView.Tile"/>), allocated once. Sequences own blocks
/// through a <see cref="BlockManager"/> and read them through their block tables.
/// </summary>
public sealed unsafe class KvBlockPool : IDisposable
{
    public const int BlockSize = KvView.Tile;

    private readonly byte*[] _k, _v;   // per layer: [Blocks × BlockSize × g·hd] elements of Type

    public int Blocks { get; }
    public int Layers { get; }
    public int KvDim { get; }
    public KvType Type { get; }
    /// <summary>Bytes of K and V for one block across all layers.</summary>
    public static long BlockBytes(int layers, int kvDim, KvType type) => 2L * layers * BlockSize * kvDim * KvView.SizeOf(type);
    public long BytesPerBlock => BlockBytes(Layers, KvDim, Type);
    public long Bytes => BytesPerBlock * Blocks;

    public KvBlockPool(int layers, int kvDim, int blocks, KvType type = KvType.F32)
    {
        if (blocks < 1) throw new ArgumentOutOfRangeException(nameof(blocks), "the KV pool needs at least one block");
        Layers = layers; KvDim = kvDim; Blocks = blocks; Type = type;
        _k = new byte*[layers];
        _v = new byte*[layers];
        nuint bytes = (nuint)((long)blocks * BlockSize * kvDim * KvView.SizeOf(type));
        for (int l = 0; l < layers; l++)
        {
            _k[l] = (byte*)LargePages.Alloc(bytes);
            _v[l] = (byte*)LargePages.Alloc(bytes);
        }
    }

    /// <summary>How many blocks fit in <paramref name="bytes"/>.</summary>
    public static int BlocksFor(long bytes, int layers, int kvDim, KvType type = KvType.F32) =>
        (int)Math.Min(int.MaxValue, bytes / BlockBytes(layers, kvDim, type));

    public KvView View(int layer, int* blockTable) => new(_k[layer], _v[layer], KvDim, Type, blockTable);

    public void Dispose()
    {
        for (int l = 0; l < Layers; l++)
        {
            LargePages.Free(_k[l]);
            LargePages.Free(_v[l]);
            _k[l] = _v[l] = null;
        }
    }
}

/// <summary>
/// Hands out KV blocks and takes them back, with reference counts so a block holding a shared prompt prefix can
/// serve several sequences. A full block may be registered under a hash chained over every token before it; a
/// freed block keeps its hash (and so can still be hit) until the free list reuses it, oldest first.
/// </summary>
public sealed class BlockManager
{
    private readonly int[] _refCount;
    private readonly ulong[] _hash;                  // 0 = not registered
    private readonly int[][] _tokens;                // the tokens a registered block holds (guards against collisions)
    private readonly LinkedList<int> _free = new();  // oldest freed first: reuse evicts the least recently released
    private readonly LinkedListNode<int>?[] _freeNode;
    private readonly Dictionary<ulong, int> _byHash = new();
    private int _used;

    public int Total { get; }
    public int BlockSize { get; }
    public bool PrefixCaching { get; }
    public int FreeCount => _free.Count;
    public int UsedCount => _used;
    public long PrefixHits { get; private set; }
    public long PrefixLookups { get; private set; }

    public BlockManager(int blocks, int blockSize, bool prefixCaching = true)
    {
        Total = blocks; BlockSize = blockSize; PrefixCaching = prefixCaching;
        _refCount = new int[blocks];
        _hash = new ulong[blocks];
        _tokens = new int[blocks][];
        _freeNode = new LinkedListNode<int>?[blocks];
        for (int i = 0; i < blocks; i++) _freeNode[i] = _free.AddLast(i);
    }

    public int RefCount(int block) => _refCount[block];

    /// <summary>A fresh block (reference count 1); null when none is free.</summary>
    public int? Allocate()
    {
        var node = _free.First;
        if (node == null) return null;
        int id = node.Value;
        TakeFromFree(id);
        if (_hash[id] != 0)
        {
            if (_byHash.TryGetValue(_hash[id], out int owner) && owner == id) _byHash.Remove(_hash[id]);
            _hash[id] = 0;
            _tokens[id] = [];
        }
        _refCount[id] = 1;
        return id;
    }

    /// <summary>Drops one reference; at zero the block goes to the back of the free list, its hash kept.</summary>
    public void Release(int block)
    {
        if (_refCount[block] <= 0) throw new InvalidOperationException($"block {block} released more often than allocated");
        if (--_refCount[block] == 0)
        {
            _freeNode[block] = _free.AddLast(block);
            _used--;
        }
    }

    /// <summary>Hash of a block given the hash of everything before it (0 for the first block).</summary>
    public static ulong ChainHash(ulong previous, ReadOnlySpan<int> tokens)
    {
        ulong v = XxHash64.HashToUInt64(MemoryMarshal.AsBytes(tokens), unchecked((long)previous));  // chained through the seed
        return v == 0 ? 1 : v;   // 0 means "no hash"
    }

    /// <summary>Records that <paramref name="block"/> is full and holds <paramref name="tokens"/> after a prefix hashing to the chain.</summary>
    public void Register(int block, ulong hash, ReadOnlySpan<int> tokens)
    {
        if (!PrefixCaching || _hash[block] == hash) return;
        _hash[block] = hash;
        _tokens[block] = tokens.ToArray();
        _byHash[hash] = block;
    }

    /// <summary>A cached block holding exactly these tokens after this prefix, now referenced once more; or null.</summary>
    public int? TryReuse(ulong hash, ReadOnlySpan<int> tokens)
    {
        if (!PrefixCaching) return null;
        PrefixLookups++;
        if (!_byHash.TryGetValue(hash, out int id) || !tokens.SequenceEqual(_tokens[id])) return null;
        if (_refCount[id] == 0) TakeFromFree(id);
        _refCount[id]++;
        PrefixHits++;
        return id;
    }

    private void TakeFromFree(int id)
    {
        _free.Remove(_freeNode[id]!);
        _freeNode[id] = null;
        _used++;
    }

    /// <summary>Throws if the books do not balance: free + used = total, counts consistent with the free list.</summary>
    public void CheckInvariants()
    {
        if (_free.Count + _used != Total) throw new InvalidOperationException($"free {_free.Count} + used {_used} ≠ total {Total}");
        int inUse = 0;
        for (int i = 0; i < Total; i++)
        {
            if (_refCount[i] < 0) throw new InvalidOperationException($"block {i} has a negative reference count");
            bool free = _freeNode[i] != null;
            if (free == (_refCount[i] > 0)) throw new InvalidOperationException($"block {i}: reference count {_refCount[i]} but {(free ? "" : "not ")}on the free list");
            if (!free) inUse++;
        }
        if (inUse != _used) throw new InvalidOperationException($"{inUse} blocks referenced but {_used} counted as used");
    }
}

/// <summary>One sequence's view of the pool: its block table, pinned so attention can read it by pointer.</summary>
public sealed unsafe class PagedKvCache : IKvCache
{
    private readonly KvBlockPool _pool;
    private readonly int[] _table;      // pinned: block ids for positions 0, 16, 32, …
    private int _count;

    public PagedKvCache(KvBlockPool pool, int maxPositions)
    {
        _pool = pool;
        _table = GC.AllocateArray<int>(Math.Max(1, (maxPositions + KvBlockPool.BlockSize - 1) / KvBlockPool.BlockSize), pinned: true);
    }

    public int Capacity => _count * KvBlockPool.BlockSize;
    public int BlockCount => _count;
    public int this[int i] => _table[i];
    public int MaxBlocks => _table.Length;

    public void Add(int block)
    {
        if (_count == _table.Length) throw new InvalidOperationException("block table full: the sequence is longer than its maximum");
        _table[_count++] = block;
    }

    public void Clear() => _count = 0;

    public KvView Layer(int layer)
    {
        fixed (int* t = _table) return _pool.View(layer, t);   // pinned array: the pointer stays valid
    }

    public void Dispose() { }
}
