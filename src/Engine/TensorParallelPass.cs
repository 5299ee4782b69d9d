using System.Diagnostics;
using System.Numerics.Tensors;
using MiniLlm.Kernels;
using MiniLlm.Loader;

namespace MiniLlm.Engine;

/// <summary>
/// A forward pass of up to <see cref="MaxRows"/> rows (a decode step, a short prompt, or a step of several sequences,
/// each against its own cache) as one dispatch in which every thread owns a fixed share of every layer (tensor parallelism, Megatron style, across the
/// cores of one CPU): its query and KV heads (their q/k/v rows, RoPE, cache writes and attention) and its slice of
/// the MLP (gate/up rows); o and down are cut by columns, so each thread's partial output needs only what that thread
/// computed, and the partials are added after a barrier. Two barriers a layer instead of five fork-joins (q/k/v,
/// attention, o, gate/up, down), no serial RoPE or cache write between them, and every thread reads the same weights
/// and KV heads on every pass, so they stay in its own cache.
/// <para>
/// Used for weights served from the last-level cache (tiny-kjv): there the fork-joins and the trips of data between
/// cores are a large part of a token. The two vCPUs of this project's VMs do not share an L3 and a round trip
/// between them takes ~630 ns (C ping-pong). Every thread keeps its own copy of the residual stream and adds the
/// partials in the same order, so the copies stay identical bit for bit.
/// </para>
/// <para>
/// A decode step's products are GEMV slices (<see cref="MatMul.GemvSlice"/>); a prompt's are GEMMs over blocks of
/// the weights on each thread alone (<see cref="SliceGemm"/>), and every row-wise op (norms, RoPE, SwiGLU, the
/// residual adds) then reads rows its own thread wrote. In the op-by-op prefill each product's columns were cut
/// between the threads, so every such op read half its input from the other core's cache. Longer prompts and steps go
/// through it in passes of <see cref="MaxRows"/> (<c>LlamaModel.ForwardInChunks</c>, <c>ForwardInPasses</c>).
/// </para>
/// </summary>
internal sealed unsafe class TensorParallelPass : ParallelJob, IDisposable
{
    /// <summary>Most tokens one pass takes (a longer prompt goes op by op, its products large enough for both threads).</summary>
    public const int MaxRows = 64;

    private readonly WorkerPool _pool;
    private readonly Attention _attention;
    private readonly RopeTable _rope;
    private readonly LlamaConfig _c;
    private readonly LlamaModel.LayerMatrices[] _layers;
    private readonly WeightMatrix _embed, _lmHead;
    private readonly float[] _finalNorm;
    private readonly int _threads, _maxRows;

    // Per thread, the activations of its own columns (ThreadActivations), each set in its own allocation.
    private readonly NativeBuffer[] _actBuffers;
    private readonly ThreadActivations[] _act;
    private readonly nint[] _qBlocks, _attBlocks;   // per thread: its q and attention output, for Attention's head blocks
    private readonly int _ldq, _ldk, _ldf;          // floats per row: hT·hd, gT·hd, the widest MLP slice
    // Per thread: its copy of the residual stream x [M × d], its normed input xb [M × d], bf16 pair scratch [max(d, f)],
    // a key stage for tile transposes [16 × g·hd / threads], its GEMM, and two sets of partial sublayer outputs
    // [threads × M × d] (thread u's at u·_maxRows·d).
    private readonly NativeBuffer[] _x, _xb, _pairs, _stage;
    private readonly SliceGemm[] _gemm;
    private readonly NativeBuffer _partsA, _partsB, _sum;
    private readonly long[] _sync = new long[32];   // the barrier counter sits at [16], away from other data
    private volatile bool _failed;
    private Exception? _firstError;                 // the failure that stopped a pass (the others only saw _failed)

    // This pass's arguments (set before the dispatch).
    private readonly int[] _tokens, _positions;     // per row: its token and its position in its sequence
    private int _rows;
    private readonly SequenceSlice[] _sequences;    // the pass's sequences, their rows back to back
    private readonly int[] _firstRow;               // per sequence: its first row
    private int _sequenceCount;
    private readonly SequenceSlice[] _one = new SequenceSlice[1];
    private readonly KvView[] _kv;                  // [layer × sequence] at l·_maxRows + s
    private readonly AttentionSegment[] _segments;  // layer by layer, a sequence's rows against that layer's KV
    private float* _logits;                         // [_logitSequences × V], each sequence's last row; null: none
    private int _logitSequences;                    // the first this many sequences end in this pass (the last may go on)
    private enum Mode { Forward, StreamOnly, GemmsOnly }
    private Mode _mode;
    private float _sink;
    private OpProfiler? _prof;
    private long _t0;

    /// <summary>
    /// One thread's activations, each [rows × its columns]: q and attention output of its query heads (hT·hd), k and
    /// v of its KV heads (gT·hd), gate and up of its MLP slice (up to <see cref="_ldf"/>). Not columns of arrays shared
    /// by the threads: there a row interleaves the threads' columns, and the hardware prefetchers, running along one
    /// thread's part of a row, pull in lines of the next row that the other thread is writing. A C#
    /// probe of RoPE over 29 rows of q as the threads cut them: 15 ns a call alone, 110–180 ns with the other thread
    /// rotating its columns of the same rows, 15 ns with 128 floats of gap between rows.
    /// </summary>
    private readonly struct ThreadActivations(float* q, float* k, float* v, float* att, float* hb, float* hb2)
    {
        public readonly float* Q = q, K = k, V = v, Att = att, Hb = hb, Hb2 = hb2;
    }

    /// <summary>Floats left unused before and after each thread's activations: 1 KiB keeps other allocations' lines out of the prefetchers' reach.</summary>
    private const int ActivationGuard = 256;

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

    /// <param name="maxRows">Rows the activation buffers hold (at most <see cref="MaxRows"/> are used).</param>
    public TensorParallelPass(WorkerPool pool, Attention attention, RopeTable rope, LlamaConfig config, LlamaModel.LayerMatrices[] layers,
        WeightMatrix embed, WeightMatrix lmHead, float[] finalNorm, int maxRows)
    {
        _pool = pool; _attention = attention; _rope = rope; _c = config; _layers = layers;
        _embed = embed; _lmHead = lmHead; _finalNorm = finalNorm;
        _threads = pool.Threads;
        _maxRows = Math.Clamp(maxRows, 1, MaxRows);
        int d = config.HiddenSize, T = _threads;
        _ldq = config.QDim / T; _ldk = config.KvDim / T;
        for (int t = 0; t < T; t++) { Share(t, config.IntermediateSize, 32, out int f0, out int f1); _ldf = Math.Max(_ldf, f1 - f0); }
        _actBuffers = new NativeBuffer[T]; _act = new ThreadActivations[T]; _qBlocks = new nint[T]; _attBlocks = new nint[T];
        for (int t = 0; t < T; t++)
        {
            long rowsQ = (long)_maxRows * _ldq, rowsK = (long)_maxRows * _ldk, rowsF = (long)_maxRows * _ldf;
            _actBuffers[t] = new NativeBuffer(ActivationGuard + 2 * rowsQ + 2 * rowsK + 2 * rowsF + ActivationGuard);
            float* a = _actBuffers[t].Pointer + ActivationGuard;
            _act[t] = new ThreadActivations(a, a + rowsQ, a + rowsQ + rowsK, a + rowsQ + 2 * rowsK, a + 2 * rowsQ + 2 * rowsK, a + 2 * rowsQ + 2 * rowsK + rowsF);
            _qBlocks[t] = (nint)_act[t].Q; _attBlocks[t] = (nint)_act[t].Att;
        }
        long rowsD = (long)_maxRows * d;
        _x = new NativeBuffer[T]; _xb = new NativeBuffer[T]; _pairs = new NativeBuffer[T]; _stage = new NativeBuffer[T];
        _gemm = new SliceGemm[T];
        for (int t = 0; t < T; t++)
        {
            _x[t] = new NativeBuffer(rowsD);
            _xb[t] = new NativeBuffer(rowsD);
            _pairs[t] = new NativeBuffer(Math.Max(d, config.IntermediateSize));
            _stage[t] = new NativeBuffer((long)KvView.Tile * config.KvDim / T);   // fp32 or bf16 elements: fp32 is the larger
            _gemm[t] = new SliceGemm();
        }
        _partsA = new NativeBuffer(T * rowsD);
        _partsB = new NativeBuffer(T * rowsD);
        _sum = new NativeBuffer(T * rowsD);
        _tokens = new int[_maxRows];
        _positions = new int[_maxRows];
        _sequences = new SequenceSlice[_maxRows];
        _firstRow = new int[_maxRows];
        _kv = new KvView[layers.Length * _maxRows];
        _segments = new AttentionSegment[layers.Length * _maxRows];
    }

    /// <summary>
    /// Whether a pass of <paramref name="rows"/> tokens goes this way: a decode step, or a prompt of up to
    /// <see cref="MaxRows"/> tokens whose GEMMs fill more than five eighths of their X panels (16 rows up to 16, then
    /// 32). Each thread runs every product on its blocks alone, so a panel's empty rows cost it the full FMAs; the
    /// op-by-op path gives such prompts the skinny kernels. tiny-kjv prefill, this pass ÷ op by op, with each thread's
    /// activations in its own allocation (in-process alternation, medians of 41): 11 tokens 0.91, 12 0.88, 16 0.73,
    /// 21 0.92, 24 0.87, 29 0.83, 32 0.84, 42 0.95, 46 0.92, 48 0.89, 56 0.82, 64 0.87; 10 tokens 0.91, 9 0.95
    /// (kept op by op: at 10 the rule would also take 20 and 40), 20 1.00, 40 1.03, 36 1.12, 8 1.21, 2–6 1.3–2.0.
    /// Session 18's cut (three quarters, from 12 tokens) was measured before the activations were split.
    /// </summary>
    public bool Takes(int rows)
    {
        if (rows == 1) return true;
        if (rows < MinPromptRows || rows > _maxRows) return false;
        int panel = rows <= 16 ? 16 : 32;
        return rows * 8 > (rows + panel - 1) / panel * panel * 5;
    }

    /// <summary>Fewest prompt tokens for this pass: below it the 16-row panel is mostly empty.</summary>
    public const int MinPromptRows = 11;

    /// <summary>
    /// Tokens at positions start.. through every layer, their keys and values into <paramref name="cache"/>; logits
    /// [V] of the last one, or none when <paramref name="logits"/> is null (a chunk of a longer prompt: the LM head
    /// is skipped). <paramref name="endPass"/> false leaves the profiled pass open for the prompt's next chunk.
    /// </summary>
    public void Run(ReadOnlySpan<int> tokens, int start, IKvCache cache, float* logits, OpProfiler? prof, bool endPass = true)
    {
        _one[0] = new SequenceSlice(start, tokens.Length, cache);
        Run(tokens, _one, logits, prof, endPass);
    }

    /// <summary>
    /// Several sequences in one pass (a batch: decode steps, prompts, or both), each its <see cref="SequenceSlice.Count"/>
    /// tokens back to back in <paramref name="tokens"/>, each against its own cache; logits [sequences × V], each
    /// sequence's last token, or none when null. Every product runs once over all the rows.
    /// <paramref name="logitSequences"/> ≥ 0: logits for the first that many sequences only (a pass of a longer step
    /// whose last sequence goes on in the next pass).
    /// </summary>
    public void Run(ReadOnlySpan<int> tokens, ReadOnlySpan<SequenceSlice> sequences, float* logits, OpProfiler? prof, bool endPass = true, int logitSequences = -1)
    {
        if (tokens.Length < 1 || tokens.Length > _maxRows) throw new ArgumentOutOfRangeException(nameof(tokens), $"{tokens.Length} tokens: one tensor-parallel pass takes 1..{_maxRows}");
        int rows = 0;
        foreach (var q in sequences) rows += q.Count;
        if (sequences.IsEmpty || rows != tokens.Length)
            throw new ArgumentException($"{sequences.Length} sequences of {rows} tokens in all, for {tokens.Length} tokens", nameof(sequences));
        if (logitSequences > sequences.Length) throw new ArgumentOutOfRangeException(nameof(logitSequences), $"{logitSequences} of {sequences.Length} sequences");
        tokens.CopyTo(_tokens);
        _rows = tokens.Length; _sequenceCount = sequences.Length;
        _logitSequences = logitSequences < 0 ? sequences.Length : logitSequences;
        _logits = _logitSequences == 0 ? null : logits;
        int B = sequences.Length, L = _layers.Length;
        for (int b = 0, row = 0; b < B; row += sequences[b].Count, b++)
        {
            var q = sequences[b];
            if (q.Count < 1) throw new ArgumentException($"sequence {b} has no tokens", nameof(sequences));
            _sequences[b] = q; _firstRow[b] = row;
            for (int i = 0; i < q.Count; i++) _positions[row + i] = q.Start + i;
            for (int l = 0; l < L; l++) _kv[l * _maxRows + b] = q.Cache.Layer(l);
        }
        if (_rows == 1) _attention.PrepareDecode(_qBlocks, _c.NumAttentionHeads, _c.NumKeyValueHeads, _c.HeadDim, _attBlocks);
        else
        {
            for (int l = 0; l < L; l++)
                for (int b = 0; b < B; b++)
                    _segments[l * B + b] = new AttentionSegment(_firstRow[b], _sequences[b].Count, _sequences[b].Start, _kv[l * _maxRows + b]);
            _attention.PreparePrefill(_qBlocks, _c.NumAttentionHeads, _c.NumKeyValueHeads, _c.HeadDim, _segments.AsSpan(0, L * B), _attBlocks, perLayer: B);
        }
        _prof = prof;
        prof?.EnsureThreads(_threads);
        _t0 = prof == null ? 0 : Stopwatch.GetTimestamp();
        Dispatch(Mode.Forward);
        if (prof != null)
        {
            prof.Record(OpKind.LmHead, -1, ref _t0);   // thread 0's share, then waiting for the others
            if (endPass) prof.EndPass();
        }
    }

    /// <summary>
    /// One step's weight reads with loads only, each thread its own rows and column slices in the kernels' order,
    /// in one dispatch, without the step's barriers or any arithmetic (the decode ceiling's stream: what the
    /// memory system gives this cut of the weights; the barriers are the step's own cost).
    /// </summary>
    public void StreamPass()
    {
        _prof = null;
        Dispatch(Mode.StreamOnly);
    }

    /// <summary>
    /// Every layer's products for <paramref name="rows"/> rows as a pass of that many tokens runs them (each thread
    /// its blocks, on whatever the buffers hold), in one dispatch without barriers, norms, attention or adds: the
    /// prefill ceiling's compute roof for this cut.
    /// </summary>
    public void GemmPass(int rows)
    {
        if (rows < 1 || rows > _maxRows) throw new ArgumentOutOfRangeException(nameof(rows), $"a GEMM pass takes 1..{_maxRows} rows, got {rows}");
        _rows = rows;
        _prof = null;
        Dispatch(Mode.GemmsOnly);
    }

    private void Dispatch(Mode mode)
    {
        _mode = mode;
        _sync[16] = 0;
        _failed = false;
        _firstError = null;
        try { _pool.RunPinned(this, _threads); }
        catch (AggregateException) when (_firstError != null) { throw _firstError; }
        finally { _mode = Mode.Forward; }
    }

    public override void Execute(int t, int worker)
    {
        try
        {
            switch (_mode)
            {
                case Mode.StreamOnly: Stream(t); break;
                case Mode.GemmsOnly: Gemms(t); break;
                default: Pass(t, worker); break;
            }
        }
        catch (Exception e)
        {
            if (!_failed) Interlocked.CompareExchange(ref _firstError, e, null);
            _failed = true;   // releases the other threads from the barriers
            throw;
        }
    }

    /// <summary>
    /// Waits until every thread has arrived at its <paramref name="epoch"/>-th barrier of this dispatch. Profiled, each
    /// thread's wait is recorded (<see cref="OpProfiler.WaitSeconds"/>): the time a faster core spends on a slower one.
    /// </summary>
    private void Barrier(ref int epoch, int t)
    {
        long target = (long)++epoch * _threads;
        var prof = _prof;
        long since = prof == null ? 0 : Stopwatch.GetTimestamp();
        Interlocked.Increment(ref _sync[16]);
        while (Volatile.Read(ref _sync[16]) < target)
        {
            if (_failed) throw new OperationCanceledException("another thread of the pass failed");
            Thread.SpinWait(1);
        }
        prof?.RecordWait(t, Stopwatch.GetTimestamp() - since);
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
        int d = c.HiddenSize, M = _rows, hT = c.NumAttentionHeads / _threads, gT = c.NumKeyValueHeads / _threads;
        var (q0, q1, k0, k1, f0, f1, v0, v1) = SharesOf(t);
        float* x = _x[t].Pointer, xb = _xb[t].Pointer;
        float* partsA = PartsOf(_partsA, t), partsB = PartsOf(_partsB, t);
        var a = _act[t];
        float eps = (float)c.RmsNormEps;
        var prof = t == 0 ? _prof : null;
        int epoch = 0;

        for (int r = 0; r < M; r++) _embed.WidenRow(_tokens[r], new Span<float>(x + (long)r * d, d));   // x[M × d]
        prof?.Record(OpKind.Embedding, -1, ref _t0);
        for (int l = 0; l < _layers.Length; l++)
        {
            var L = _layers[l];
            // ── attention, this thread's heads ──
            fixed (float* wn = L.AttnNorm) Ops.RmsNorm(x, wn, xb, M, d, eps);
            prof?.Record(OpKind.AttnNorm, l, ref _t0);
            Qkv(t, L, xb, q0, q1, k0, k1);   // q[:, q0..q1), k[:, k0..k1), v[:, k0..k1)
            prof?.Record(OpKind.QProj, l, ref _t0);
            for (int r = 0; r < M; r++)
            {
                _rope.Apply(a.Q + (long)r * _ldq, hT, _positions[r]);
                _rope.Apply(a.K + (long)r * _ldk, gT, _positions[r]);
            }
            for (int b = 0; b < _sequenceCount; b++) WriteKv(_kv[l * _maxRows + b], t, k0, k1, _firstRow[b], _sequences[b].Count, _sequences[b].Start, ref epoch);
            prof?.Record(OpKind.Rope, l, ref _t0);
            if (M == 1) _attention.DecodeHeads(_kv[l * _maxRows], _positions[0], t * hT, (t + 1) * hT, worker);   // att[:, q0..q1)
            else _attention.PrefillHeads(l, t * hT, (t + 1) * hT, worker);
            prof?.Record(OpKind.AttnScores, l, ref _t0);
            Product(t, a.Att - q0, _ldq, L.Wo, 0, d, q0, q1, partsA, d);   // partial o [M × d]
            prof?.Record(OpKind.OProj, l, ref _t0);
            AddSublayer(x, _partsA, t, ref epoch);   // x += Σ partial o
            prof?.Record(OpKind.AttnResidual, l, ref _t0);

            // ── MLP, this thread's slice ──
            fixed (float* wn = L.FfnNorm) Ops.RmsNorm(x, wn, xb, M, d, eps);
            prof?.Record(OpKind.FfnNorm, l, ref _t0);
            GateUp(t, L, xb, f0, f1);   // hb[:, f0..f1) = gate, hb2[:, f0..f1) = up
            prof?.Record(OpKind.Gate, l, ref _t0);
            for (int r = 0; r < M; r++) Ops.SwiGlu(a.Hb + (long)r * _ldf, a.Hb2 + (long)r * _ldf, f1 - f0);
            prof?.Record(OpKind.SwiGlu, l, ref _t0);
            // Partials alternate between two sets: a thread may start this one while another still reads the last.
            Product(t, a.Hb - f0, _ldf, L.Wdown, 0, d, f0, f1, partsB, d);   // partial down [M × d]
            prof?.Record(OpKind.Down, l, ref _t0);
            AddSublayer(x, _partsB, t, ref epoch);   // x += Σ partial down
            prof?.Record(OpKind.FfnResidual, l, ref _t0);
        }
        int B = _logitSequences;
        fixed (float* wn = _finalNorm)
            for (int b = 0; b < B; b++)   // each sequence's last row only: xb[B × d]
                Ops.RmsNorm(x + (long)(_firstRow[b] + _sequences[b].Count - 1) * d, wn, xb + (long)b * d, 1, d, eps);
        prof?.Record(OpKind.FinalNorm, -1, ref _t0);
        if (_logits == null) return;
        if (B == 1) MatMul.GemvSlice(xb, _lmHead, v0, v1, 0, d, _logits, _pairs[t].Pointer);   // logits[v0..v1)
        else _gemm[t].Run(xb, d, B, [new(_lmHead.Block(v0, v1, 0, d), _logits + v0, c.VocabSize)]);   // logits[:, v0..v1)
    }

    /// <summary>Thread t's q, k and v columns of the pass's rows: GEMV slices for one row, one GEMM over the three blocks (X packed once) for more.</summary>
    private void Qkv(int t, LlamaModel.LayerMatrices L, float* xb, int q0, int q1, int k0, int k1)
    {
        int d = _c.HiddenSize;
        var a = _act[t];
        if (_rows == 1)
        {
            Product(t, xb, d, L.Wq, q0, q1, 0, d, a.Q - q0, _ldq);
            Product(t, xb, d, L.Wk, k0, k1, 0, d, a.K - k0, _ldk);
            Product(t, xb, d, L.Wv, k0, k1, 0, d, a.V - k0, _ldk);
            return;
        }
        _gemm[t].Run(xb, d, _rows, [new(L.Wq.Block(q0, q1, 0, d), a.Q, _ldq), new(L.Wk.Block(k0, k1, 0, d), a.K, _ldk), new(L.Wv.Block(k0, k1, 0, d), a.V, _ldk)]);
    }

    /// <summary>Thread t's gate and up columns [f0, f1) of the pass's rows.</summary>
    private void GateUp(int t, LlamaModel.LayerMatrices L, float* xb, int f0, int f1)
    {
        int d = _c.HiddenSize;
        var a = _act[t];
        if (_rows == 1)
        {
            Product(t, xb, d, L.Wgate, f0, f1, 0, d, a.Hb - f0, _ldf);
            Product(t, xb, d, L.Wup, f0, f1, 0, d, a.Hb2 - f0, _ldf);
            return;
        }
        _gemm[t].Run(xb, d, _rows, [new(L.Wgate.Block(f0, f1, 0, d), a.Hb, _ldf), new(L.Wup.Block(f0, f1, 0, d), a.Hb2, _ldf)]);
    }

    /// <summary>y[r, n0..n1) = Σ_{k∈[c0,c1)} W[n,k]·x[r,k] for the pass's rows (x rows ldx apart, y rows ldy apart).</summary>
    private void Product(int t, float* x, int ldx, in WeightMatrix w, int n0, int n1, int c0, int c1, float* y, int ldy)
    {
        if (_rows == 1) MatMul.GemvSlice(x, w, n0, n1, c0, c1, y, _pairs[t].Pointer);
        else _gemm[t].Run(x + c0, ldx, _rows, [new(w.Block(n0, n1, c0, c1), y + n0, ldy)]);
    }

    /// <summary>
    /// Elements [k0, k1) (thread t's KV heads) of one sequence's keys and values (its <paramref name="count"/> rows from
    /// row <paramref name="first"/>, at positions from <paramref name="start"/>) into its cache: whole new tiles straight
    /// into their layout, other positions as rows. A position that completes a tile of rows has its keys transposed,
    /// every thread's columns staged first and written back after a barrier (the transposed tile overwrites rows
    /// holding the other threads' columns). Every thread meets the same barriers: they follow the positions only.
    /// </summary>
    private void WriteKv(in KvView kv, int t, int k0, int k1, int first, int count, int start, ref int epoch)
    {
        var a = _act[t];
        for (int i = 0; i < count;)
        {
            int pos = start + i;
            // Thread t's k and v rows hold elements [k0, k1): shifted back by k0, element e is at key[e].
            float* key = a.K + (long)(first + i) * _ldk - k0, value = a.V + (long)(first + i) * _ldk - k0;
            if (pos % KvView.Tile == 0 && count - i >= KvView.Tile)
            {
                kv.WriteTileColumns(pos / KvView.Tile, key, value, _ldk, k0, k1);
                i += KvView.Tile;
                continue;
            }
            kv.WriteRowPart(pos, key, value, k0, k1);
            if (pos % KvView.Tile == KvView.Tile - 1)
            {
                byte* stage = (byte*)_stage[t].Pointer;
                kv.CopyKeyColumns(pos / KvView.Tile, k0, k1, stage);
                Barrier(ref epoch, t);
                kv.StoreKeyColumns(pos / KvView.Tile, k0, k1, stage);
            }
            i++;
        }
    }

    /// <summary>Thread u's [rows × d] of a set of per-thread buffers (<see cref="_partsA"/>, <see cref="_partsB"/>, <see cref="_sum"/>).</summary>
    private float* PartsOf(NativeBuffer set, int u) => set.Pointer + (long)u * _maxRows * _c.HiddenSize;

    /// <summary>
    /// Waits for every thread's partial sublayer output, then x += Σ_u parts[u] in thread order (the pass's rows):
    /// the same operations on every thread, so every copy of x agrees.
    /// </summary>
    private void AddSublayer(float* x, NativeBuffer parts, int t, ref int epoch)
    {
        Barrier(ref epoch, t);
        int n = _rows * _c.HiddenSize;
        var sum = new Span<float>(PartsOf(_sum, t), n);
        new ReadOnlySpan<float>(PartsOf(parts, 0), n).CopyTo(sum);
        for (int u = 1; u < _threads; u++) TensorPrimitives.Add(sum, new ReadOnlySpan<float>(PartsOf(parts, u), n), sum);
        var xs = new Span<float>(x, n);
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

    /// <summary>Thread t's products of every layer, as <see cref="Pass"/> runs them for <see cref="_rows"/> rows.</summary>
    private void Gemms(int t)
    {
        int d = _c.HiddenSize;
        var (q0, q1, k0, k1, f0, f1, _, _) = SharesOf(t);
        float* xb = _xb[t].Pointer, parts = PartsOf(_partsA, t);
        var a = _act[t];
        foreach (var L in _layers)
        {
            Qkv(t, L, xb, q0, q1, k0, k1);
            Product(t, a.Att - q0, _ldq, L.Wo, 0, d, q0, q1, parts, d);
            GateUp(t, L, xb, f0, f1);
            Product(t, a.Hb - f0, _ldf, L.Wdown, 0, d, f0, f1, parts, d);
        }
    }

    public void Dispose()
    {
        foreach (var b in _x) b.Dispose();
        foreach (var b in _xb) b.Dispose();
        foreach (var b in _pairs) b.Dispose();
        foreach (var b in _stage) b.Dispose();
        foreach (var b in _actBuffers) b.Dispose();
        _partsA.Dispose(); _partsB.Dispose(); _sum.Dispose();
    }
}
