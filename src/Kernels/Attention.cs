using System.Numerics.Tensors;

namespace MiniLlm.Kernels;

/// <summary>
/// Where one layer's keys and values live: contiguous rows, or fixed-size blocks found through a block table
/// (paged cache). A row is one position: [g·hd] floats, KV heads side by side.
/// </summary>
public readonly unsafe struct KvView
{
    public readonly float* K;            // contiguous: [positions × rowStride]; paged: pool base
    public readonly float* V;
    public readonly int* BlockTable;      // null when contiguous; else block ids for positions 0, B, 2B, …
    public readonly int BlockSize;        // positions per block (paged)
    public readonly long BlockStride;     // floats from one block to the next in the pool (paged)
    public readonly int RowStride;        // floats per position (g·hd)

    public KvView(float* k, float* v, int rowStride)
    {
        K = k; V = v; RowStride = rowStride; BlockTable = null; BlockSize = 0; BlockStride = 0;
    }

    public KvView(float* kPool, float* vPool, int* blockTable, int blockSize, long blockStride, int rowStride)
    {
        K = kPool; V = vPool; BlockTable = blockTable; BlockSize = blockSize; BlockStride = blockStride; RowStride = rowStride;
    }

    public float* KeyRow(int pos) => K + Offset(pos);
    public float* ValueRow(int pos) => V + Offset(pos);

    private long Offset(int pos) => BlockTable == null
        ? (long)pos * RowStride
        : BlockTable[pos / BlockSize] * BlockStride + (long)(pos % BlockSize) * RowStride;
}

/// <summary>
/// Causal grouped-query attention for the S new tokens of one sequence at positions start..start+S−1, each over
/// keys 0..its own position. One chunk = one (token, query head); the scores of one row live in per-worker
/// scratch of context length, so no S×S matrix is ever built.
/// </summary>
public sealed unsafe class Attention : ParallelJob
{
    private readonly WorkerPool _pool;
    private readonly float[][] _scores;   // per worker: [maxContext]
    private float* _q, _out;
    private KvView _kv;
    private int _start, _heads, _kvHeads, _headDim;
    private float _scale;

    public int MaxContext { get; }

    public Attention(WorkerPool pool, int maxContext)
    {
        _pool = pool;
        MaxContext = maxContext;
        _scores = new float[pool.Threads][];
        for (int i = 0; i < _scores.Length; i++) _scores[i] = GC.AllocateUninitializedArray<float>(maxContext, pinned: true);
    }

    /// <param name="q">[S × heads·hd], RoPE already applied.</param>
    /// <param name="output">[S × heads·hd].</param>
    public void Run(float* q, int s, int start, int heads, int kvHeads, int headDim, in KvView kv, float* output)
    {
        if (start + s > MaxContext) throw new ArgumentOutOfRangeException(nameof(s), $"positions up to {start + s} exceed the attention scratch ({MaxContext})");
        _q = q; _out = output; _kv = kv; _start = start; _heads = heads; _kvHeads = kvHeads; _headDim = headDim;
        _scale = 1f / MathF.Sqrt(headDim);
        int chunks = s * heads;
        if ((long)chunks * (start + s) * headDim < 1 << 14) { for (int c = 0; c < chunks; c++) Execute(c, 0); }
        else _pool.Run(this, chunks);
    }

    public override void Execute(int chunk, int worker)
    {
        int t = chunk / _heads, h = chunk % _heads;
        int pos = _start + t, hd = _headDim;
        int kvh = h / (_heads / _kvHeads);
        var q = new ReadOnlySpan<float>(_q + ((long)t * _heads + h) * hd, hd);
        var scores = _scores[worker].AsSpan(0, pos + 1);
        for (int j = 0; j <= pos; j++)
            scores[j] = TensorPrimitives.Dot(q, new ReadOnlySpan<float>(_kv.KeyRow(j) + kvh * hd, hd)) * _scale;
        TensorPrimitives.SoftMax(scores, scores);
        var o = new Span<float>(_out + ((long)t * _heads + h) * hd, hd);
        o.Clear();
        for (int j = 0; j <= pos; j++)
            TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(_kv.ValueRow(j) + kvh * hd, hd), scores[j], o, o);
    }
}
