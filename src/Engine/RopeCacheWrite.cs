using MiniLlm.Kernels;

namespace MiniLlm.Engine;

/// <summary>
/// The step between the q/k/v projections and attention, for one layer: RoPE on every row's q and k, then each
/// sequence's new k and v rows into its cache (a full tile's keys transposed as it completes). One chunk per
/// sequence, spread over the pool when a step holds several: a batched decode writes B scattered rows of
/// g·hd keys and values into caches the weights have long since pushed out of every cache level, so each
/// write waits on memory; on one thread that took 2.6 % of a stories110m b16 step and 5 % at b64 (profile rows).
/// On the pool, alternating in one process (fp32 stories110m, 64 decode steps from position 1, medians of
/// per-round ratios): b8 0.965 and 0.994, b16 0.988 and 0.997, b32 0.989, b64 0.995, b4 1.000 of the serial time.
/// The rest of the row is the cache's memory, not arithmetic; the gain grows with the cores a step can spread over.
/// </summary>
internal sealed unsafe class RopeCacheWrite : ParallelJob
{
    /// <summary>Sequences from which a step spreads the work over the pool (below: the caller alone, no dispatch).</summary>
    public const int ParallelMinSequences = 4;

    private readonly WorkerPool _pool;
    private readonly RopeTable _rope;
    private SequenceSlice[] _sequences = new SequenceSlice[1];
    private AttentionSegment[] _segments = new AttentionSegment[1];
    private int[] _firstRow = new int[1];
    private readonly int _heads, _kvHeads, _qDim, _kvDim;   // query and KV heads; row widths of q and k/v
    private float* _q, _k, _v;
    private int _layer;

    public RopeCacheWrite(WorkerPool pool, RopeTable rope, int heads, int kvHeads)
    {
        _pool = pool;
        _rope = rope;
        _heads = heads; _kvHeads = kvHeads;
        _qDim = heads * rope.HeadDim; _kvDim = kvHeads * rope.HeadDim;
    }

    /// <param name="q">[T × heads·hd], rotated in place.</param>
    /// <param name="k">[T × kvHeads·hd], rotated in place, then stored.</param>
    /// <param name="v">[T × kvHeads·hd], stored.</param>
    /// <returns>Per sequence: its rows and its layer-<paramref name="layer"/> KV, for attention (valid until the next call).</returns>
    public ReadOnlySpan<AttentionSegment> Run(ReadOnlySpan<SequenceSlice> sequences, int layer, float* q, float* k, float* v)
    {
        int n = sequences.Length;
        if (_sequences.Length < n) { _sequences = new SequenceSlice[n]; _segments = new AttentionSegment[n]; _firstRow = new int[n]; }
        int row = 0;
        for (int i = 0; i < n; i++) { _sequences[i] = sequences[i]; _firstRow[i] = row; row += sequences[i].Count; }
        _q = q; _k = k; _v = v; _layer = layer;
        if (n >= ParallelMinSequences && _pool.Threads > 1) _pool.Run(this, n);
        else for (int i = 0; i < n; i++) Execute(i, 0);
        return _segments.AsSpan(0, n);
    }

    /// <summary>Sequence <paramref name="chunk"/>: its rows rotated, its k/v rows stored, its attention segment set.</summary>
    public override void Execute(int chunk, int worker)
    {
        var seq = _sequences[chunk];
        int first = _firstRow[chunk];
        var kv = seq.Cache.Layer(_layer);
        for (int s = 0; s < seq.Count; s++)
        {
            int row = first + s, pos = seq.Start + s;
            _rope.Apply(_q + (long)row * _qDim, _heads, pos);
            _rope.Apply(_k + (long)row * _kvDim, _kvHeads, pos);
        }
        kv.WriteRows(seq.Start, seq.Count, _k + (long)first * _kvDim, _v + (long)first * _kvDim);
        _segments[chunk] = new AttentionSegment(first, seq.Count, seq.Start, kv);
    }
}
