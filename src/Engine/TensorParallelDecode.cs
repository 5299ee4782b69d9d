using System.Diagnostics;
using System.Numerics.Tensors;
using MiniLlm.Kernels;
using MiniLlm.Loader;

namespace MiniLlm.Engine;

/// <summary>
/// A decode step of one sequence as one dispatch in which every thread owns a fixed share of every layer (tensor
/// parallelism, Megatron style, across the cores of one CPU): its query and KV heads (their q/k/v rows, RoPE, cache
/// writes and attention) and its slice of the MLP (gate/up rows); o and down are cut by columns, so each thread's
/// partial output needs only what that thread computed, and the partials are added after a barrier. Two barriers a
/// layer instead of five fork-joins (q/k/v, attention, o, gate/up, down), no serial RoPE or cache write between
/// them, and every thread reads the same weights and KV heads on every token, so they stay in its own cache.
/// <para>
/// Used for weights served from the last-level cache (tiny-kjv): there the fork-joins and the trips of data between
/// cores are a large part of a token. The two vCPUs of this project's VMs do not share an L3 and a round trip
/// between them takes ~630 ns (C ping-pong). Every thread keeps its own copy of the residual stream and adds the
/// partials in the same order, so the copies stay identical bit for bit.
/// </para>
/// </summary>
internal sealed unsafe class TensorParallelDecode : ParallelJob, IDisposable
{
    private readonly WorkerPool _pool;
    private readonly Attention _attention;
    private readonly RopeTable _rope;
    private readonly LlamaConfig _c;
    private readonly LlamaModel.LayerMatrices[] _layers;
    private readonly WeightMatrix _embed, _lmHead;
    private readonly float[] _finalNorm;
    private readonly int _threads;

    // Shared activations, each thread writing and reading only its own ranges of them.
    private readonly float* _q, _k, _v, _att, _hb, _hb2;   // [h·hd], [g·hd], [g·hd], [h·hd], [f], [f]
    // Per thread: its copy of the residual stream x [d], its normed input xb [d], bf16 pair scratch [max(d, f)],
    // a key stage for tile transposes [16 × g·hd / threads], and two sets of partial sublayer outputs [threads × d].
    private readonly NativeBuffer[] _x, _xb, _pairs, _stage;
    private readonly NativeBuffer _partsA, _partsB, _sum;
    private readonly long[] _sync = new long[32];   // the barrier counter sits at [16], away from other data
    private volatile bool _failed;
    private Exception? _firstError;                 // the failure that stopped a step (the others only saw _failed)

    // This step's arguments (set before the dispatch).
    private int _token, _pos;
    private readonly KvView[] _kv;
    private float* _logits;
    private bool _streamOnly;
    private float _sink;
    private OpProfiler? _prof;
    private long _t0;

    public static bool Supported(LlamaConfig c, int threads, LlamaModel.LayerMatrices[] layers, WeightMatrix lmHead)
    {
        if (threads < 2 || c.NumKeyValueHeads % threads != 0 || c.HeadDim % 16 != 0) return false;
        // column slices of o and down on multiples of 32 (the bf16 pair layout)
        if (c.HiddenSize % 32 != 0 || c.QDim / threads % 32 != 0 || c.IntermediateSize % 32 != 0) return false;
        var type = lmHead.Type;
        if (type is not (WeightType.F32 or WeightType.BF16)) return false;
        foreach (var L in layers)
            foreach (var w in new[] { L.Wq, L.Wk, L.Wv, L.Wo, L.Wgate, L.Wup, L.Wdown })
                if (w.Type != type) return false;
        return true;
    }

    public TensorParallelDecode(WorkerPool pool, Attention attention, RopeTable rope, LlamaConfig config, LlamaModel.LayerMatrices[] layers,
        WeightMatrix embed, WeightMatrix lmHead, float[] finalNorm, float* q, float* k, float* v, float* att, float* hb, float* hb2)
    {
        _pool = pool; _attention = attention; _rope = rope; _c = config; _layers = layers;
        _embed = embed; _lmHead = lmHead; _finalNorm = finalNorm;
        _threads = pool.Threads;
        _q = q; _k = k; _v = v; _att = att; _hb = hb; _hb2 = hb2;
        int d = config.HiddenSize, T = _threads;
        _x = new NativeBuffer[T]; _xb = new NativeBuffer[T]; _pairs = new NativeBuffer[T]; _stage = new NativeBuffer[T];
        for (int t = 0; t < T; t++)
        {
            _x[t] = new NativeBuffer(d);
            _xb[t] = new NativeBuffer(d);
            _pairs[t] = new NativeBuffer(Math.Max(d, config.IntermediateSize));
            _stage[t] = new NativeBuffer((long)KvView.Tile * config.KvDim / T);   // fp32 or bf16 elements: fp32 is the larger
        }
        _partsA = new NativeBuffer((long)T * d);
        _partsB = new NativeBuffer((long)T * d);
        _sum = new NativeBuffer((long)T * d);
        _kv = new KvView[layers.Length];
    }

    /// <summary>Token <paramref name="token"/> at <paramref name="pos"/> through every layer; logits [V].</summary>
    public void Step(int token, int pos, IKvCache cache, float* logits, OpProfiler? prof)
    {
        for (int l = 0; l < _layers.Length; l++) _kv[l] = cache.Layer(l);
        _token = token; _pos = pos; _logits = logits; _streamOnly = false;
        _prof = prof;
        _t0 = prof == null ? 0 : Stopwatch.GetTimestamp();
        Dispatch();
        if (prof != null)
        {
            prof.Record(OpKind.LmHead, -1, ref _t0);   // thread 0's share, then waiting for the others
            prof.EndPass();
        }
    }

    /// <summary>
    /// One step's weight reads with loads only, each thread its own rows and column slices in the kernels' order,
    /// in one dispatch, without the step's barriers or any arithmetic (the decode ceiling's stream: what the
    /// memory system gives this cut of the weights; the barriers are the step's own cost).
    /// </summary>
    public void StreamPass()
    {
        _streamOnly = true;
        _prof = null;
        try { Dispatch(); }
        finally { _streamOnly = false; }
    }

    private void Dispatch()
    {
        _attention.PrepareDecode(_q, _c.NumAttentionHeads, _c.NumKeyValueHeads, _c.HeadDim, _att);
        _sync[16] = 0;
        _failed = false;
        _firstError = null;
        try { _pool.RunPinned(this, _threads); }
        catch (AggregateException) when (_firstError != null) { throw _firstError; }
    }

    public override void Execute(int t, int worker)
    {
        try
        {
            if (_streamOnly) Stream(t);
            else Pass(t, worker);
        }
        catch (Exception e)
        {
            if (!_failed) Interlocked.CompareExchange(ref _firstError, e, null);
            _failed = true;   // releases the other threads from the barriers
            throw;
        }
    }

    /// <summary>Waits until every thread has arrived at its <paramref name="epoch"/>-th barrier of this dispatch.</summary>
    private void Barrier(ref int epoch)
    {
        long target = (long)++epoch * _threads;
        Interlocked.Increment(ref _sync[16]);
        while (Volatile.Read(ref _sync[16]) < target)
        {
            if (_failed) throw new OperationCanceledException("another thread of the decode step failed");
            Thread.SpinWait(1);
        }
    }

    /// <summary>Rows [r0, r1) of a dimension of n cut in <see cref="_threads"/> parts of whole units (the last takes any remainder).</summary>
    private void Share(int t, int n, int unit, out int r0, out int r1)
    {
        int units = n / unit;
        r0 = units * t / _threads * unit;
        r1 = t == _threads - 1 ? n : units * (t + 1) / _threads * unit;
    }

    /// <summary>What thread t owns: [q0, q1) its query heads' q rows, att and o columns; [k0, k1) its KV heads' k/v
    /// rows and cache elements; [f0, f1) its gate/up rows and down columns; [v0, v1) its LM head rows.</summary>
    private readonly record struct Shares(int Q0, int Q1, int K0, int K1, int F0, int F1, int V0, int V1);

    private Shares SharesOf(int t)
    {
        int hd = _c.HeadDim, hT = _c.NumAttentionHeads / _threads, gT = _c.NumKeyValueHeads / _threads;
        Share(t, _c.IntermediateSize, 32, out int f0, out int f1);
        Share(t, _c.VocabSize, 16, out int v0, out int v1);
        return new Shares(t * hT * hd, (t + 1) * hT * hd, t * gT * hd, (t + 1) * gT * hd, f0, f1, v0, v1);
    }

    private void Pass(int t, int worker)
    {
        var c = _c;
        int d = c.HiddenSize, hT = c.NumAttentionHeads / _threads, gT = c.NumKeyValueHeads / _threads;
        var (q0, q1, k0, k1, f0, f1, v0, v1) = SharesOf(t);
        float* x = _x[t].Pointer, xb = _xb[t].Pointer, pairs = _pairs[t].Pointer;
        float eps = (float)c.RmsNormEps;
        var prof = t == 0 ? _prof : null;
        int epoch = 0;

        _embed.WidenRow(_token, new Span<float>(x, d));   // x[d]
        prof?.Record(OpKind.Embedding, -1, ref _t0);
        for (int l = 0; l < _layers.Length; l++)
        {
            var L = _layers[l];
            var kv = _kv[l];
            // ── attention, this thread's heads ──
            fixed (float* wn = L.AttnNorm) Ops.RmsNorm(x, wn, xb, 1, d, eps);
            prof?.Record(OpKind.AttnNorm, l, ref _t0);
            MatMul.GemvSlice(xb, L.Wq, q0, q1, 0, d, _q, pairs);
            MatMul.GemvSlice(xb, L.Wk, k0, k1, 0, d, _k, pairs);
            MatMul.GemvSlice(xb, L.Wv, k0, k1, 0, d, _v, pairs);
            prof?.Record(OpKind.QProj, l, ref _t0);
            _rope.Apply(_q + q0, hT, _pos);
            _rope.Apply(_k + k0, gT, _pos);
            kv.WriteRowPart(_pos, _k, _v, k0, k1);
            if (_pos % KvView.Tile == KvView.Tile - 1)
            {
                // the position completes its tile: the keys go transposed, each thread's columns staged first
                byte* stage = (byte*)_stage[t].Pointer;
                kv.CopyKeyColumns(_pos / KvView.Tile, k0, k1, stage);
                Barrier(ref epoch);
                kv.StoreKeyColumns(_pos / KvView.Tile, k0, k1, stage);
            }
            prof?.Record(OpKind.Rope, l, ref _t0);
            _attention.DecodeHeads(kv, _pos, t * hT, (t + 1) * hT, worker);   // att[q0..q1)
            prof?.Record(OpKind.AttnScores, l, ref _t0);
            MatMul.GemvSlice(_att, L.Wo, 0, d, q0, q1, _partsA.Pointer + (long)t * d, pairs);   // partial o [d]
            prof?.Record(OpKind.OProj, l, ref _t0);
            AddSublayer(x, _partsA.Pointer, t, ref epoch);   // x += Σ partial o
            prof?.Record(OpKind.AttnResidual, l, ref _t0);

            // ── MLP, this thread's slice ──
            fixed (float* wn = L.FfnNorm) Ops.RmsNorm(x, wn, xb, 1, d, eps);
            prof?.Record(OpKind.FfnNorm, l, ref _t0);
            MatMul.GemvSlice(xb, L.Wgate, f0, f1, 0, d, _hb, pairs);
            MatMul.GemvSlice(xb, L.Wup, f0, f1, 0, d, _hb2, pairs);
            prof?.Record(OpKind.Gate, l, ref _t0);
            Ops.SwiGlu(_hb + f0, _hb2 + f0, f1 - f0);
            prof?.Record(OpKind.SwiGlu, l, ref _t0);
            // Partials alternate between two sets: a thread may start this one while another still reads the last.
            MatMul.GemvSlice(_hb, L.Wdown, 0, d, f0, f1, _partsB.Pointer + (long)t * d, pairs);   // partial down [d]
            prof?.Record(OpKind.Down, l, ref _t0);
            AddSublayer(x, _partsB.Pointer, t, ref epoch);   // x += Σ partial down
            prof?.Record(OpKind.FfnResidual, l, ref _t0);
        }
        fixed (float* wn = _finalNorm) Ops.RmsNorm(x, wn, xb, 1, d, eps);
        prof?.Record(OpKind.FinalNorm, -1, ref _t0);
        MatMul.GemvSlice(xb, _lmHead, v0, v1, 0, d, _logits, pairs);   // logits[v0..v1)
    }

    /// <summary>
    /// Waits for every thread's partial sublayer output, then x += Σ_u parts[u] in thread order: the same operations
    /// on every thread, so every copy of x agrees.
    /// </summary>
    private void AddSublayer(float* x, float* parts, int t, ref int epoch)
    {
        Barrier(ref epoch);
        int d = _c.HiddenSize;
        var sum = new Span<float>(_sum.Pointer + (long)t * d, d);
        new ReadOnlySpan<float>(parts, d).CopyTo(sum);
        for (int u = 1; u < _threads; u++) TensorPrimitives.Add(sum, new ReadOnlySpan<float>(parts + (long)u * d, d), sum);
        var xs = new Span<float>(x, d);
        TensorPrimitives.Add(xs, sum, xs);
    }

    private void Stream(int t)
    {
        int d = _c.HiddenSize;
        var (q0, q1, k0, k1, f0, f1, v0, v1) = SharesOf(t);
        float s = 0;
        foreach (var L in _layers)
        {
            s += MatMul.StreamSlice(L.Wq, q0, q1, 0, d) + MatMul.StreamSlice(L.Wk, k0, k1, 0, d) + MatMul.StreamSlice(L.Wv, k0, k1, 0, d);
            s += MatMul.StreamSlice(L.Wo, 0, d, q0, q1);
            s += MatMul.StreamSlice(L.Wgate, f0, f1, 0, d) + MatMul.StreamSlice(L.Wup, f0, f1, 0, d);
            s += MatMul.StreamSlice(L.Wdown, 0, d, f0, f1);
        }
        s += MatMul.StreamSlice(_lmHead, v0, v1, 0, d);
        if (t == 0) _sink = s;
    }

    public void Dispose()
    {
        foreach (var b in _x) b.Dispose();
        foreach (var b in _xb) b.Dispose();
        foreach (var b in _pairs) b.Dispose();
        foreach (var b in _stage) b.Dispose();
        _partsA.Dispose(); _partsB.Dispose(); _sum.Dispose();
    }
}
