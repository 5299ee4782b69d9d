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

/// <summary>One sequence's part of an attention call: its rows in q/output, the position of the first, and its KV.</summary>
public readonly struct AttentionSegment(int row, int count, int start, KvView kv)
{
    public readonly int Row = row;        // first row of this sequence in q and output
    public readonly int Count = count;    // new tokens of this sequence
    public readonly int Start = start;    // position of the first of them
    public readonly KvView Kv = kv;       // keys/values for positions 0..Start+Count−1, already written
}

/// <summary>
/// Causal grouped-query attention for the new tokens of one or more sequences, each token over keys 0..its own
/// position of its own sequence. One chunk = one (token, query head); the scores of one row live in per-worker
/// scratch of context length, so no S×S matrix is ever built.
/// </summary>
public sealed unsafe class Attention : ParallelJob
{
    private readonly WorkerPool _pool;
    private readonly float[][] _scores;   // per worker: [maxContext]
    private AttentionSegment[] _segments = new AttentionSegment[1];
    private int[] _firstChunk = new int[2];   // prefix sums of Count·heads per segment
    private int _segmentCount;
    private float* _q, _out;
    private int _heads, _kvHeads, _headDim;
    private float _scale;

    public int MaxContext { get; }

    public Attention(WorkerPool pool, int maxContext)
    {
        _pool = pool;
        MaxContext = maxContext;
        _scores = new float[pool.Threads][];
        for (int i = 0; i < _scores.Length; i++) _scores[i] = GC.AllocateUninitializedArray<float>(maxContext, pinned: true);
    }

    /// <summary>One sequence: rows 0..s−1 at positions start..start+s−1.</summary>
    public void Run(float* q, int s, int start, int heads, int kvHeads, int headDim, in KvView kv, float* output) =>
        Run(q, heads, kvHeads, headDim, [new AttentionSegment(0, s, start, kv)], output);

    /// <param name="q">[T × heads·hd], RoPE already applied; T = Σ segment counts.</param>
    /// <param name="output">[T × heads·hd].</param>
    public void Run(float* q, int heads, int kvHeads, int headDim, ReadOnlySpan<AttentionSegment> segments, float* output)
    {
        if (_segments.Length < segments.Length)
        {
            _segments = new AttentionSegment[segments.Length];
            _firstChunk = new int[segments.Length + 1];
        }
        long work = 0;
        int chunks = 0;
        for (int i = 0; i < segments.Length; i++)
        {
            var g = segments[i];
            if (g.Start + g.Count > MaxContext)
                throw new ArgumentOutOfRangeException(nameof(segments), $"positions up to {g.Start + g.Count} exceed the attention scratch ({MaxContext})");
            _segments[i] = g;
            _firstChunk[i] = chunks;
            chunks += g.Count * heads;
            work += (long)g.Count * heads * (g.Start + g.Count) * headDim;
        }
        _firstChunk[segments.Length] = chunks;
        _segmentCount = segments.Length;
        _q = q; _out = output; _heads = heads; _kvHeads = kvHeads; _headDim = headDim;
        _scale = 1f / MathF.Sqrt(headDim);
        if (work < 1 << 14) { for (int c = 0; c < chunks; c++) Execute(c, 0); }
        else _pool.Run(this, chunks);
    }

    public override void Execute(int chunk, int worker)
    {
        int si = 0;
        while (_firstChunk[si + 1] <= chunk) si++;   // few segments: a linear walk is cheapest
        ref readonly var seg = ref _segments[si];
        int local = chunk - _firstChunk[si];
        int t = local / _heads, h = local % _heads;
        int row = seg.Row + t, pos = seg.Start + t, hd = _headDim;
        int kvh = h / (_heads / _kvHeads);
        var kv = seg.Kv;
        var q = new ReadOnlySpan<float>(_q + ((long)row * _heads + h) * hd, hd);
        var scores = _scores[worker].AsSpan(0, pos + 1);
        for (int j = 0; j <= pos; j++)
            scores[j] = TensorPrimitives.Dot(q, new ReadOnlySpan<float>(kv.KeyRow(j) + kvh * hd, hd)) * _scale;
        TensorPrimitives.SoftMax(scores, scores);
        var o = new Span<float>(_out + ((long)row * _heads + h) * hd, hd);
        o.Clear();
        for (int j = 0; j <= pos; j++)
            TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(kv.ValueRow(j) + kvh * hd, hd), scores[j], o, o);
    }
}
