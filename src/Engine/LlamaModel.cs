using System.Diagnostics;
using MiniLlm.Kernels;
using MiniLlm.Loader;

namespace MiniLlm.Engine;

/// <summary>One sequence's share of a batched forward pass: <see cref="Count"/> new tokens from position <see cref="Start"/>.</summary>
public readonly record struct SequenceSlice(int Start, int Count, IKvCache Cache);

/// <summary>What <see cref="LlamaModel.TuneGemvPrefetch"/> measured: the distance kept, and each candidate's median
/// decode step (seconds).</summary>
public sealed record GemvPrefetchTuning(int Bytes, int[] Candidates, double[] MedianSeconds)
{
    public override string ToString() =>
        $"bf16 GEMV prefetch {Bytes} B ahead (" + string.Join(", ", Candidates.Select((c, i) => $"{c} B {MedianSeconds[i] * 1e3:F2} ms")) + " median decode step)";
}

/// <summary>How the weights are held in memory: as stored in the checkpoint, or quantized to Q8_0 at load.</summary>
public enum WeightFormat { Stored, Q8 }

/// <summary>Which positions of a forward pass produce logits.</summary>
public enum LogitsFor { LastToken, AllTokens }

/// <summary>
/// The Llama forward pass over S tokens of one sequence against its KV cache (S = prompt chunk for prefill,
/// S = 1 for decode). Weights stay in the checkpoint's mapped memory and dtype; activations are fp32.
/// Symbols: d hidden, h query heads, g KV heads, hd head dim, f intermediate, V vocab, S tokens this call.
/// </summary>
public sealed unsafe class LlamaModel : IDisposable
{
    private readonly ModelFiles? _owned;
    private readonly WorkerPool _pool;
    private readonly RowOps _rowOps;               // norms, residual adds and SwiGLU over many rows, spread over the pool
    private readonly MatMul _matmul;
    private readonly Attention _attention;
    private readonly RopeTable _rope;

    // Weights (views into the checkpoint).
    private readonly WeightMatrix _embed;          // [V × d]
    private readonly LayerMatrices[] _layers;      // L of them
    private readonly WeightMatrix _lmHead;         // [V × d] (the embedding when tied)
    private readonly float[] _finalNorm;           // [d], widened once: norms are tiny

    // Activations, sized for MaxTokens rows.
    private readonly NativeBuffer _x;       // [S × d]    residual stream
    private readonly NativeBuffer _xb;      // [S × d]    normed input of a sublayer
    private readonly NativeBuffer _xb2;     // [S × d]    sublayer output before the residual add
    private readonly NativeBuffer _q;       // [S × h·hd]
    private readonly NativeBuffer _k;       // [S × g·hd]
    private readonly NativeBuffer _v;       // [S × g·hd]
    private readonly NativeBuffer _att;     // [S × h·hd] attention output per head, concatenated
    private readonly NativeBuffer _hb;      // [S × f]    gate, then silu(gate)·up
    private readonly NativeBuffer _hb2;     // [S × f]    up
    private readonly NativeBuffer _qkv1;    // [h·hd + 2·g·hd] one token's q, k, v from the fused q/k/v matrix
    private readonly NativeBuffer _gateUp1; // [2f]       one token's gate, then up, from the fused gate/up matrix
    private readonly SequenceSlice[] _one = new SequenceSlice[1];
    private readonly RopeCacheWrite _ropeWrite;
    private readonly TensorParallelPass? _tp;     // one sequence's decode step or short prompt as one dispatch, when the model suits it

    internal sealed class LayerMatrices
    {
        public required float[] AttnNorm;   // [d]
        public required WeightMatrix Wq;    // [h·hd × d]
        public required WeightMatrix Wk;    // [g·hd × d]
        public required WeightMatrix Wv;    // [g·hd × d]
        public required WeightMatrix Wo;    // [d × h·hd]
        public required float[] FfnNorm;    // [d]
        public required WeightMatrix Wgate; // [f × d]
        public required WeightMatrix Wup;   // [f × d]
        public required WeightMatrix Wdown; // [d × f]
        public WeightMatrix? Wqkv;          // [(h + 2g)·hd × d]: Wq, Wk, Wv where they lie end to end in memory (see FusedRows)
        public WeightMatrix? WgateUp;       // [2f × d]: Wgate then Wup, likewise
    }

    /// <summary>
    /// Matrices that lie one after another in memory, with one element type and one row length, as one matrix of all
    /// their rows (null when they do not). The weight arena places each layer's q, k, v and its gate, up in that order
    /// on 4 KiB boundaries, so wherever a matrix's bytes are a whole number of pages they join.
    /// </summary>
    private static WeightMatrix? FusedRows(params WeightMatrix[] ws)
    {
        long end = ws[0].Pointer;
        int rows = 0;
        foreach (var w in ws)
        {
            if (w.Pointer != end || w.Type != ws[0].Type || w.Cols != ws[0].Cols || w.RowBytes != ws[0].RowBytes) return null;
            end += w.ByteLength;
            rows += w.Rows;
        }
        return new WeightMatrix(ws[0].Pointer, ws[0].Type, rows, ws[0].Cols);
    }

    public LlamaConfig Config { get; }
    public ModelFiles Files { get; }
    public TextTokenizer Tokenizer => Files.Tokenizer ?? throw new InvalidOperationException($"{Files.Directory}: model has no tokenizer.model");
    public int Threads => _pool.Threads;

    /// <summary>One pass of <paramref name="probe"/> on this model's worker threads, GB/s (the ceiling beside a decode run).</summary>
    public double MeasureReadBandwidth(Ceilings.ReadProbe probe) => probe.Measure(_pool);
    /// <summary>Logits of a sequence independent of what it is batched with (see <see cref="MatMul.BatchInvariant"/>).</summary>
    public bool BatchInvariant
    {
        get => _matmul.BatchInvariant;
        set => _matmul.BatchInvariant = _attention.BatchInvariant = value;
    }

    /// <summary>Q8 decode with int8 activations and VNNI dot products instead of fp32 activations (see <see cref="MatMul.Q8Int8Activations"/>).</summary>
    public bool Q8Int8Activations
    {
        get => _matmul.Q8Int8Activations;
        set => _matmul.Q8Int8Activations = value;
    }

    /// <summary>When set, every forward pass adds its per-op wall time here.</summary>
    public OpProfiler? Profiler { get; set; }
    /// <summary>Most tokens one <see cref="Forward"/> call takes (longer prompts are fed in chunks).</summary>
    public int MaxTokens { get; }
    /// <summary>Longest sequence: the model's max_position_embeddings.</summary>
    public int Context => Config.MaxPositionEmbeddings;

    // Every matrix the model holds itself (copied onto 2 MiB pages, or quantized) lives in one arena.
    private byte* _arena;
    private long _arenaUsed, _arenaBytes;
    private readonly bool _copyWeights;

    /// <summary>
    /// True when the stored matrices are read in place from the memory-mapped checkpoint (4 KiB pages); false when
    /// they were copied into memory on 2 MiB pages at load, which streams faster (see <see cref="LargePages"/>).
    /// Matrices quantized at load are in that memory either way.
    /// </summary>
    public bool WeightsMapped => !_copyWeights;

    /// <summary>How the matrices are held (Q8 halves bf16's bytes and quarters fp32's).</summary>
    public WeightFormat Format { get; }

    /// <summary>Bytes of every weight the forward pass reads, as held in memory (quantized bytes for Q8).</summary>
    public long WeightBytes { get; }

    /// <summary>What the matrices are held as: the stored dtype, or Q8_0.</summary>
    public string WeightLabel => Format == WeightFormat.Q8 ? "Q8_0" : DTypes.Name(Files.Weights.Layers[0].Wq.DType);

    /// <summary>Bytes per weight of the projection matrices (4, 2 or 36/32 for Q8).</summary>
    public double WeightBytesPerElement => Format == WeightFormat.Q8 ? Q8Load.BlockBytes / (double)Q8Load.Block : DTypes.SizeOf(Files.Weights.Layers[0].Wq.DType);

    /// <summary>Writes this model's weights as held (Q8_0 matrices as U8 blocks, norms as F32) to a safetensors file.</summary>
    public void SaveWeights(string path)
    {
        var specs = new List<SafetensorsWriter.TensorSpec>();
        var data = new Dictionary<string, (nint Pointer, long Bytes, float[]? Floats)>();
        void Mat(string name, WeightMatrix m)
        {
            if (m.Type != WeightType.Q8) throw new InvalidOperationException($"{name}: only Q8 weights are exported ({m.Type} here)");
            specs.Add(new(name, DType.U8, [m.Rows, m.RowBytes]));
            data[name] = (m.Pointer, m.ByteLength, null);
        }
        void Vec(string name, float[] v)
        {
            specs.Add(new(name, DType.F32, [v.Length]));
            data[name] = (0, 0, v);
        }
        Mat("model.embed_tokens.weight", _embed);
        for (int l = 0; l < _layers.Length; l++)
        {
            var L = _layers[l];
            string p = $"model.layers.{l}.";
            Vec(p + "input_layernorm.weight", L.AttnNorm);
            Mat(p + "self_attn.q_proj.weight", L.Wq); Mat(p + "self_attn.k_proj.weight", L.Wk);
            Mat(p + "self_attn.v_proj.weight", L.Wv); Mat(p + "self_attn.o_proj.weight", L.Wo);
            Vec(p + "post_attention_layernorm.weight", L.FfnNorm);
            Mat(p + "mlp.gate_proj.weight", L.Wgate); Mat(p + "mlp.up_proj.weight", L.Wup); Mat(p + "mlp.down_proj.weight", L.Wdown);
        }
        Vec("model.norm.weight", _finalNorm);
        if (_lmHead.Pointer != _embed.Pointer) Mat("lm_head.weight", _lmHead);
        SafetensorsWriter.Write(path, specs, (t, stream) =>
        {
            var (ptr, bytes, floats) = data[t.Name];
            if (floats != null) stream.Write(System.Runtime.InteropServices.MemoryMarshal.AsBytes(floats.AsSpan()));
            else for (long o = 0; o < bytes; o += int.MaxValue / 2)
                stream.Write(new ReadOnlySpan<byte>((void*)(ptr + (nint)o), (int)Math.Min(int.MaxValue / 2, bytes - o)));
        }, new Dictionary<string, string> { ["format"] = "pt", [ModelWeights.QuantKey] = ModelWeights.QuantQ8, ["minillm_quant_block"] = "32 weights: fp32 scale + 32 int8" });
    }

    /// <param name="mapWeights">
    /// Read the matrices in place from the memory-mapped file instead of copying them onto 2 MiB pages at load
    /// (no second copy in memory, slower streaming).
    /// </param>
    public LlamaModel(ModelFiles files, int threads = 0, int maxTokens = 512, bool ownsFiles = false, WeightFormat format = WeightFormat.Stored, bool mapWeights = false)
    {
        Format = files.Weights.Quantized ? WeightFormat.Q8 : format;
        _copyWeights = !mapWeights;
        Files = files;
        Config = files.Config;
        if (ownsFiles) _owned = files;
        var c = Config;
        if (threads < 0) throw new ArgumentOutOfRangeException(nameof(threads), "threads must be ≥ 1 (0 = one per core)");
        _pool = new WorkerPool(threads == 0 ? WorkerPool.DefaultThreads : threads);
        _matmul = new MatMul(_pool);
        MaxTokens = Math.Max(1, Math.Min(maxTokens, c.MaxPositionEmbeddings));
        _attention = new Attention(_pool, c.MaxPositionEmbeddings);
        _rope = new RopeTable(c.HeadDim, c.MaxPositionEmbeddings, c.RopeTheta,
            c.RopeScaling is { } s ? new Llama3Scaling(s.Factor, s.LowFreqFactor, s.HighFreqFactor, s.OriginalMaxPositionEmbeddings) : null);
        _ropeWrite = new RopeCacheWrite(_pool, _rope, c.NumAttentionHeads, c.NumKeyValueHeads);
        _rowOps = new RowOps(_pool);

        var w = files.Weights;
        var matrices = new List<TensorView> { w.Embed };
        if (w.LmHead.Pointer != w.Embed.Pointer) matrices.Add(w.LmHead);
        foreach (var l in w.Layers) matrices.AddRange([l.Wq, l.Wk, l.Wv, l.Wo, l.Wgate, l.Wup, l.Wdown]);
        _arenaBytes = matrices.Sum(t => Aligned(HeldBytes(t)));
        if (_arenaBytes > 0) _arena = (byte*)LargePages.Alloc((nuint)_arenaBytes);
        _embed = Matrix(w.Embed);
        _lmHead = w.LmHead.Pointer == w.Embed.Pointer ? _embed : Matrix(w.LmHead);
        _finalNorm = Vector(w.FinalNorm);
        _layers = w.Layers.Select(l => new LayerMatrices
        {
            AttnNorm = Vector(l.AttnNorm), Wq = Matrix(l.Wq), Wk = Matrix(l.Wk), Wv = Matrix(l.Wv), Wo = Matrix(l.Wo),
            FfnNorm = Vector(l.FfnNorm), Wgate = Matrix(l.Wgate), Wup = Matrix(l.Wup), Wdown = Matrix(l.Wdown),
        }).ToArray();
        foreach (var L in _layers)
        {
            L.Wqkv = FusedRows(L.Wq, L.Wk, L.Wv);
            L.WgateUp = FusedRows(L.Wgate, L.Wup);
        }

        WeightBytes = _embed.ByteLength + (_lmHead.Pointer == _embed.Pointer ? 0 : _lmHead.ByteLength) + 4L * c.HiddenSize * (2 * c.NumHiddenLayers + 1)
            + _layers.Sum(l => l.Wq.ByteLength + l.Wk.ByteLength + l.Wv.ByteLength + l.Wo.ByteLength + l.Wgate.ByteLength + l.Wup.ByteLength + l.Wdown.ByteLength);

        // Short-row GEMV tiles and the bf16 GEMV's prefetch each suit one side of the cache (see MatMul).
        _matmul.CacheResidentWeights = WeightBytes < Ceilings.LastLevelCacheBytes;

        long S = MaxTokens;
        _x = new NativeBuffer(S * c.HiddenSize);
        _xb = new NativeBuffer(S * c.HiddenSize);
        _xb2 = new NativeBuffer(S * c.HiddenSize);
        _q = new NativeBuffer(S * c.QDim);
        _k = new NativeBuffer(S * c.KvDim);
        _v = new NativeBuffer(S * c.KvDim);
        _att = new NativeBuffer(S * c.QDim);
        _hb = new NativeBuffer(S * c.IntermediateSize);
        _hb2 = new NativeBuffer(S * c.IntermediateSize);
        _qkv1 = new NativeBuffer(c.QDim + 2 * c.KvDim);
        _gateUp1 = new NativeBuffer(2 * c.IntermediateSize);
        if (_matmul.CacheResidentWeights && TensorParallelPass.Supported(c, _pool.Threads, _layers, _lmHead))
            _tp = new TensorParallelPass(_pool, _attention, _rope, c, _layers, _embed, _lmHead, _finalNorm, MaxTokens);
    }

    /// <summary>
    /// Decode one sequence's token with every thread owning a fixed share of each layer, in one dispatch
    /// (<see cref="TensorParallelPass"/>), where the model suits it: weights served from the last-level cache,
    /// fp32 or bf16, KV heads divisible by the threads. On by default; off runs the op-by-op path (A/B runs).
    /// </summary>
    public bool TensorParallel { get; set; } = true;

    /// <summary>Whether a one-sequence decode step takes the tensor-parallel path now.</summary>
    public bool UsesTensorParallelDecode => _tp != null && TensorParallel && !BatchInvariant && MatMul.SliceSupported(_lmHead.Type);

    /// <summary>
    /// A prompt of one sequence through the same one-dispatch cut as its decode (each thread its heads and MLP slice,
    /// its GEMMs on blocks of the weights), where the model takes the tensor-parallel decode and the prompt's rows
    /// suit it (<see cref="TensorParallelPass.Takes"/>: 11–64 tokens whose GEMM panels are more than five eighths full).
    /// On by default; off runs the op-by-op prefill (A/B runs).
    /// </summary>
    public bool TensorParallelPrefill { get; set; } = true;

    /// <summary>Whether a one-sequence prompt of <paramref name="rows"/> tokens (logits for its last) takes the tensor-parallel pass.</summary>
    public bool UsesTensorParallelPrefill(int rows) => rows >= 2 && TensorParallelPrefill && UsesTensorParallelDecode && _tp!.Takes(rows);

    /// <summary>
    /// A step of several sequences (decode steps, prompts or both; logits for each one's last token) through the same
    /// one-dispatch cut, where the model takes the tensor-parallel decode and the step's rows suit the pass (the same
    /// panel rule as a prompt's, <see cref="TensorParallelPass.Takes"/>). On by default; off runs such steps op by op.
    /// </summary>
    public bool TensorParallelBatch { get; set; } = true;

    /// <summary>Whether a step of <paramref name="sequences"/> sequences and <paramref name="rows"/> tokens in all takes the tensor-parallel pass.</summary>
    public bool UsesTensorParallelBatch(int rows, int sequences) =>
        sequences >= 2 && rows >= 2 && TensorParallelBatch && UsesTensorParallelDecode && _tp!.Takes(rows);

    /// <summary>
    /// Whether a step of several sequences and <paramref name="rows"/> tokens is longer than one tensor-parallel pass and
    /// goes through it in passes (<see cref="ForwardInPasses"/>).
    /// </summary>
    public bool PassesTensorParallelBatch(int rows, int sequences) =>
        sequences >= 2 && rows > TensorParallelPass.MaxRows && UsesTensorParallelBatch(TensorParallelPass.MaxRows, 2);

    /// <summary>
    /// Whether a one-sequence prompt of <paramref name="rows"/> tokens is longer than one tensor-parallel pass and goes
    /// through it in chunks (<see cref="ForwardInChunks"/>).
    /// </summary>
    public bool ChunksTensorParallelPrefill(int rows) => rows > TensorParallelPass.MaxRows && UsesTensorParallelPrefill(TensorParallelPass.MaxRows);

    /// <summary>Opens the model directory and builds the model (which then owns the files).</summary>
    public static LlamaModel Load(string dir, int threads = 0, int maxTokens = 512, WeightFormat format = WeightFormat.Stored, bool mapWeights = false) =>
        new(ModelFiles.Open(dir, requireTokenizer: false), threads, maxTokens, ownsFiles: true, format, mapWeights);

    /// <summary>A KV cache for one sequence of up to <paramref name="capacity"/> positions (default: the full context).</summary>
    public ContiguousKvCache NewKvCache(int capacity = 0, KvType type = KvType.F32) =>
        new(Config.NumHiddenLayers, Config.KvDim, capacity <= 0 ? Context : Math.Min(capacity, Context), type);

    /// <summary>Every projection matrix of every layer.</summary>
    private IEnumerable<WeightMatrix> ProjectionMatrices() =>
        _layers.SelectMany(L => new[] { L.Wq, L.Wk, L.Wv, L.Wo, L.Wgate, L.Wup, L.Wdown });

    /// <summary>
    /// Every layer's products for <paramref name="m"/> rows, grouped and ordered as the forward pass runs them, on
    /// whatever the activation buffers hold (for the ceilings measured beside a run: no norms, attention or adds).
    /// </summary>
    private void LayerProducts(int m)
    {
        foreach (var L in _layers)
        {
            _matmul.Run(_xb.Pointer, m, [new(L.Wq, _q.Pointer), new(L.Wk, _k.Pointer), new(L.Wv, _v.Pointer)]);
            _matmul.Run(_att.Pointer, m, L.Wo, _xb2.Pointer);
            _matmul.Run(_xb.Pointer, m, [new(L.Wgate, _hb.Pointer), new(L.Wup, _hb2.Pointer)]);
            _matmul.Run(_hb.Pointer, m, L.Wdown, _xb2.Pointer);
        }
    }

    /// <summary>
    /// The compute roof prefill can actually reach: this model's own GEMMs for <paramref name="m"/> rows of X, every
    /// layer's projections in the forward pass's grouping and order (q/k/v, o, gate/up, down), so each matrix
    /// shape counts as often as a prefill runs it; the median of <paramref name="reps"/> timings, GFLOP/s. The FMA
    /// peak counts only FMAs in registers; a GEMM also packs, loads and stores, its small shapes (o, k, v) run
    /// less efficiently than its large ones, and at small M it is a different kernel altogether. A prompt of one
    /// sequence (<paramref name="sequences"/> = 1) that takes the tensor-parallel pass is measured as that pass runs
    /// its products: each thread its blocks of every weight, in one dispatch (<see cref="TensorParallelPass.GemmPass"/>).
    /// </summary>
    public double MeasureGemmGflops(int m, int reps = 5, int sequences = 1)
    {
        if (m < 1 || m > MaxTokens) throw new ArgumentOutOfRangeException(nameof(m), $"rows must be in [1, {MaxTokens}], got {m}");
        int d = Config.HiddenSize;
        var rng = new Random(5);
        for (long i = 0; i < (long)m * d; i++) _xb.Pointer[i] = (float)(rng.NextDouble() - 0.5);
        for (long i = 0; i < (long)m * Config.QDim; i++) _att.Pointer[i] = (float)(rng.NextDouble() - 0.5);
        double flops = GemmFlops(m);
        int iters = (int)Math.Clamp(2e9 / flops, 1, 1000);   // about 10 ms per timing at 200 GFLOP/s
        GemmPass(m, sequences);                               // warm: weights into cache where they fit, code jitted
        var rates = new List<double>();
        for (int r = 0; r < reps; r++)
        {
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < iters; i++) GemmPass(m, sequences);
            rates.Add(flops * iters / sw.Elapsed.TotalSeconds / 1e9);
        }
        rates.Sort();
        return rates[rates.Count / 2];
    }

    /// <summary>
    /// One timed pass of the products <see cref="MeasureGemmGflops"/> times, without a warm-up, on whatever the
    /// buffers hold (GFLOP/s): a sample taken between the passes of a run, so the roof and the passes it is set
    /// against share the same seconds of the host.
    /// </summary>
    public double SampleGemmGflops(int m, int sequences = 1)
    {
        if (m < 2 || m > MaxTokens) throw new ArgumentOutOfRangeException(nameof(m), $"rows must be in [2, {MaxTokens}], got {m}");
        long t0 = Stopwatch.GetTimestamp();
        GemmPass(m, sequences);
        return GemmFlops(m) / Stopwatch.GetElapsedTime(t0).TotalSeconds / 1e9;
    }

    private double GemmFlops(int m) => 2.0 * m * ProjectionMatrices().Sum(w => (double)w.Rows * w.Cols);

    private void GemmPass(int m, int sequences)
    {
        if (sequences == 1 ? UsesTensorParallelPrefill(m) : UsesTensorParallelBatch(m, sequences)) _tp!.GemmPass(m);   // the products as that pass cuts and runs them
        else if (sequences == 1 ? ChunksTensorParallelPrefill(m) : PassesTensorParallelBatch(m, sequences))
        {
            // as ForwardInChunks and ForwardInPasses run them: whole passes, then the rest by its length
            int chunk = TensorParallelPass.MaxRows, rest = m;
            for (; rest > chunk; rest -= chunk) _tp!.GemmPass(chunk);
            if (rest == 1) _tp!.GemmPass(1);   // a decode step's products
            else GemmPass(rest, Math.Min(sequences, rest));
        }
        else LayerProducts(m);
    }

    /// <summary>
    /// GB/s of one decode step's weight reads with no arithmetic: every matrix of every layer, then the LM head, in
    /// the forward pass's order, dispatches, chunks and threads (<see cref="MatMul.StreamOnly"/>); median of
    /// <paramref name="reps"/>. For a model that fits in the last-level cache this is the
    /// bandwidth its decode can see, fork-join and per-op ramp-up included, which one long probe stream is not.
    /// </summary>
    /// <param name="warm">One untimed pass first (false between decode steps, whose weights were just read).</param>
    public double MeasureWeightStreamGBps(int reps = 9, bool warm = true)
    {
        if (reps < 1) throw new ArgumentOutOfRangeException(nameof(reps), "reps must be ≥ 1");
        var logits = GC.AllocateUninitializedArray<float>(Config.VocabSize, pinned: true);
        long bytes = _lmHead.ByteLength + ProjectionMatrices().Sum(w => w.ByteLength);
        void Pass()
        {
            if (UsesTensorParallelDecode) { _tp!.StreamPass(); return; }   // the same bytes, cut as that decode reads them
            LayerProducts(1);
            fixed (float* y = logits) _matmul.Run(_xb.Pointer, 1, _lmHead, y);
        }
        var rates = new double[reps];
        _matmul.StreamOnly = true;
        try
        {
            if (warm) Pass();
            for (int r = 0; r < reps; r++)
            {
                long t0 = Stopwatch.GetTimestamp();
                Pass();
                rates[r] = bytes / Stopwatch.GetElapsedTime(t0).TotalSeconds / 1e9;
            }
        }
        finally { _matmul.StreamOnly = false; }
        Array.Sort(rates);
        return rates[reps / 2];
    }

    /// <summary>
    /// The bf16 GEMV's prefetch distance this model's decode reads best with on this host, measured: decode steps of
    /// one sequence on a scratch cache, each of <see cref="MatMul.Bf16GemvPrefetchCandidates"/> in turn, in rounds that
    /// rotate their order (the DRAM's speed drifts from minute to minute); the candidate with the lowest median step
    /// is kept (<see cref="MatMul.Bf16GemvPrefetchBytes"/>). Timed on whole steps, not on the projections alone: back
    /// to back, without the attention's KV reads between them, they ranked the candidates differently. Only for bf16
    /// weights read from DRAM (from the cache the GEMV does not prefetch); null otherwise. 3 × 11 steps, fewer rounds
    /// (at least 3) where a step takes over 12 ms.
    /// </summary>
    public GemvPrefetchTuning? TuneGemvPrefetch(int rounds = 11)
    {
        if (_matmul.CacheResidentWeights || !ProjectionMatrices().Any(w => w.Type == WeightType.BF16)) return null;
        var candidates = MatMul.Bf16GemvPrefetchCandidates.ToArray();
        var times = candidates.Select(_ => new List<double>()).ToArray();
        int prompt = Math.Min(KvView.Tile, MaxTokens), steps = rounds * candidates.Length + 1;
        if (prompt + steps > Context) return null;
        using var cache = NewKvCache(prompt + steps);
        var tokens = new int[prompt];
        var logits = new float[Config.VocabSize];
        int kept = _matmul.Bf16GemvPrefetchBytes, pos = prompt;
        try
        {
            Forward(tokens, 0, cache, logits);
            long t0 = Stopwatch.GetTimestamp();
            Forward(tokens.AsSpan(0, 1), pos++, cache, logits);   // warm
            double step = Stopwatch.GetElapsedTime(t0).TotalSeconds;
            rounds = Math.Clamp((int)(0.4 / Math.Max(step * candidates.Length, 1e-6)), 3, rounds);
            for (int r = 0; r < rounds; r++)
                for (int j = 0; j < candidates.Length; j++)
                {
                    int c = (j + r) % candidates.Length;
                    _matmul.Bf16GemvPrefetchBytes = candidates[c];
                    long t = Stopwatch.GetTimestamp();
                    Forward(tokens.AsSpan(0, 1), pos++, cache, logits);
                    times[c].Add(Stopwatch.GetElapsedTime(t).TotalSeconds);
                }
        }
        finally { _matmul.Bf16GemvPrefetchBytes = kept; }
        var medians = times.Select(t => t.Order().ElementAt(t.Count / 2)).ToArray();
        int best = Array.IndexOf(medians, medians.Min());
        _matmul.Bf16GemvPrefetchBytes = candidates[best];
        return GemvPrefetch = new GemvPrefetchTuning(candidates[best], candidates, medians);
    }

    /// <summary>
    /// One token's q, k, v (and its gate, up) from one GEMV over the matrices' rows end to end, where the weights lie so
    /// (<see cref="LayerMatrices.Wqkv"/>): each thread then reads one contiguous part instead of a part of each matrix,
    /// starting its streams once. Rows are summed by the same kernels either way (split points and groups stay whole),
    /// so the results are the same bits. On by default; off for A/B runs and tests.
    /// </summary>
    public bool FusedDecodeProjections { get; set; } = true;

    /// <summary>Whether layer <paramref name="layer"/>'s q/k/v and gate/up matrices lie end to end, so one token reads each group as one matrix.</summary>
    public (bool Qkv, bool GateUp) FusedProjections(int layer) => (_layers[layer].Wqkv != null, _layers[layer].WgateUp != null);

    /// <summary>The bf16 GEMV's prefetch distance in force (bytes ahead in each row; see <see cref="TuneGemvPrefetch"/>).</summary>
    public int Bf16GemvPrefetchBytes => _matmul.Bf16GemvPrefetchBytes;

    /// <summary>
    /// Runs a short prefill and a decode step on a scratch cache so the JIT has compiled every kernel path
    /// before anything is timed (otherwise TTFT measures the compiler); then, for bf16 weights read from DRAM, times
    /// the GEMV's prefetch distance (<see cref="TuneGemvPrefetch"/>, ~0.15 s at stories110m's size; <see cref="GemvPrefetch"/>).
    /// </summary>
    public void Warmup(KvType kv = KvType.F32)
    {
        // 15 prompt positions and two decoded: the first decode step fills the first KV tile, so the one-off
        // compilation of its key transpose (milliseconds) happens here, not inside a timed decode; the second reads a
        // full tile and an unfinished one's key rows, as most decode steps do (their row-score kernel compiled
        // at a process's first real decode step cost it 1–1.6 ms, which `profile` showed as layer 0's attention).
        int n = Math.Min(KvView.Tile - 1, Math.Min(MaxTokens, Context - 1));
        int decoded = n + 2 <= Context ? 2 : 1;
        using var cache = NewKvCache(n + decoded, kv);
        var tokens = new int[n];
        var logits = new float[Config.VocabSize];
        bool tensorParallelPrefill = TensorParallelPrefill;
        try
        {
            for (int rep = 0; rep < 2; rep++)
            {
                // the second prompt op by op: prompts longer than a tensor-parallel pass take that path
                TensorParallelPrefill = tensorParallelPrefill && rep == 0;
                Forward(tokens, 0, cache, logits);
                for (int i = 0; i < decoded; i++) Forward(tokens.AsSpan(0, 1), n + i, cache, logits);
            }
            // Prompts of 2–4 and 5–8 tokens take the skinny GEMM's two tile shapes, compiled at their first call: a
            // 4-token prompt's time to first token read 2.4–3.5 ms with them compiled inside it.
            foreach (int m in new[] { 3, 6 })
                if (m <= n) Forward(tokens.AsSpan(0, m), 0, cache, logits);
        }
        finally { TensorParallelPrefill = tensorParallelPrefill; }
        TuneGemvPrefetch();
    }

    /// <summary>What the last <see cref="TuneGemvPrefetch"/> found, whoever ran it (<see cref="Warmup"/>, `bench`); null: not run, or not a bf16 model from DRAM.</summary>
    public GemvPrefetchTuning? GemvPrefetch { get; private set; }

    /// <summary>
    /// Runs tokens[0..S) of one sequence at positions start..start+S−1, appending their keys and values to
    /// <paramref name="cache"/>, and writes logits: [V] for the last token, or [S × V] for every token.
    /// </summary>
    public void Forward(ReadOnlySpan<int> tokens, int start, IKvCache cache, Span<float> logits, LogitsFor which = LogitsFor.LastToken)
    {
        _one[0] = new SequenceSlice(start, tokens.Length, cache);
        Forward(tokens, _one, logits, which);
    }

    /// <summary>
    /// A prompt longer than one tensor-parallel pass (cache-resident weights, one sequence): chunks of
    /// <see cref="TensorParallelPass.MaxRows"/> tokens through that pass without logits (only the last token's are
    /// wanted), each chunk's keys and values in the cache before the next attends to them, then the rest as its length
    /// decides (that pass, a decode step, or op by op). Profiled, the whole prompt is one pass. tiny-kjv, against the
    /// whole prompt op by op (in-process alternation, medians of 41): 128 tokens 0.88 of the time, 256 0.91, 512 0.94.
    /// </summary>
    private void ForwardInChunks(ReadOnlySpan<int> tokens, in SequenceSlice seq, Span<float> logits)
    {
        int chunk = TensorParallelPass.MaxRows, done = 0, start = seq.Start;
        var cache = seq.Cache;
        for (; tokens.Length - done > chunk; done += chunk)
            _tp!.Run(tokens.Slice(done, chunk), start + done, cache, null, Profiler, endPass: false);
        Forward(tokens[done..], start + done, cache, logits);
    }

    /// <summary>
    /// A step of several sequences longer than one tensor-parallel pass: their rows, in order, in passes of
    /// <see cref="TensorParallelPass.MaxRows"/> (a sequence cut between two passes goes on in the next, attending to
    /// the keys and values the first wrote), each sequence's logits from the pass that holds its last row; then the
    /// rest as its rows decide (a pass, a decode step, or op by op). Profiled, the step is one pass.
    /// </summary>
    private void ForwardInPasses(ReadOnlySpan<int> tokens, ReadOnlySpan<SequenceSlice> sequences, Span<float> logits)
    {
        int V = Config.VocabSize, chunk = TensorParallelPass.MaxRows, b = 0, done = 0, row = 0;   // next sequence, its tokens done, rows done
        for (; tokens.Length - row > chunk; row += chunk)
        {
            int first = b, count = 0;
            for (int n = 0; n < chunk; count++)
            {
                var q = sequences[b];
                int take = Math.Min(q.Count - done, chunk - n);
                _passSlices[count] = new SequenceSlice(q.Start + done, take, q.Cache);
                n += take; done += take;
                if (done == q.Count) { b++; done = 0; }
            }
            int ending = done == 0 ? count : count - 1;   // sequences whose last row is in this pass
            fixed (float* lp = logits)
                _tp!.Run(tokens.Slice(row, chunk), _passSlices.AsSpan(0, count), lp + (long)first * V, Profiler, endPass: false, logitSequences: ending);
        }
        int rest = sequences.Length - b;
        if (_restSlices.Length < rest) _restSlices = new SequenceSlice[rest];   // grows to the largest batch once
        for (int i = 0; i < rest; i++) _restSlices[i] = sequences[b + i];
        var head = sequences[b];
        _restSlices[0] = new SequenceSlice(head.Start + done, head.Count - done, head.Cache);
        Forward(tokens[row..], _restSlices.AsSpan(0, rest), logits[(b * V)..]);
    }

    private readonly SequenceSlice[] _passSlices = new SequenceSlice[TensorParallelPass.MaxRows];
    private SequenceSlice[] _restSlices = new SequenceSlice[1];

    /// <summary>
    /// One pass over the weights for several sequences at once. <paramref name="tokens"/> holds each sequence's new
    /// tokens back to back (T = Σ Count), so every linear layer is a single GEMM over T rows; attention runs per
    /// sequence against its own cache. Logits: [sequences × V] (each sequence's last token) or [T × V].
    /// </summary>
    public void Forward(ReadOnlySpan<int> tokens, ReadOnlySpan<SequenceSlice> sequences, Span<float> logits, LogitsFor which = LogitsFor.LastToken)
    {
        var c = Config;
        int T = tokens.Length, d = c.HiddenSize, f = c.IntermediateSize;
        int h = c.NumAttentionHeads, g = c.NumKeyValueHeads, hd = c.HeadDim;
        CheckArguments(tokens, sequences, logits, which);
        if (sequences.Length == 1 && (T == 1 ? UsesTensorParallelDecode : which == LogitsFor.LastToken && UsesTensorParallelPrefill(T)))
        {
            fixed (float* lp = logits) _tp!.Run(tokens, sequences[0].Start, sequences[0].Cache, lp, Profiler);
            return;
        }
        if (sequences.Length == 1 && which == LogitsFor.LastToken && ChunksTensorParallelPrefill(T))
        {
            ForwardInChunks(tokens, sequences[0], logits);
            return;
        }
        if (which == LogitsFor.LastToken && UsesTensorParallelBatch(T, sequences.Length))
        {
            fixed (float* lp = logits) _tp!.Run(tokens, sequences, lp, Profiler);
            return;
        }
        if (which == LogitsFor.LastToken && PassesTensorParallelBatch(T, sequences.Length))
        {
            ForwardInPasses(tokens, sequences, logits);
            return;
        }
        var prof = Profiler;
        long t0 = prof == null ? 0 : Stopwatch.GetTimestamp();

        // x[T × d] = embedding rows of the tokens
        for (int t = 0; t < T; t++) _embed.WidenRow(tokens[t], new Span<float>(_x.Pointer + (long)t * d, d));
        prof?.Record(OpKind.Embedding, -1, ref t0);

        for (int l = 0; l < _layers.Length; l++)
        {
            var L = _layers[l];

            // ── attention ──
            fixed (float* wn = L.AttnNorm) _rowOps.RmsNorm(_x.Pointer, wn, _xb.Pointer, T, d, (float)c.RmsNormEps);  // xb[T × d]
            prof?.Record(OpKind.AttnNorm, l, ref t0);
            // q[T × h·hd], k[T × g·hd], v[T × g·hd]: one pass, X packed once (profiled as one op: what runs). One token
            // with the three matrices end to end: one GEMV over all their rows (FusedDecodeProjections).
            float* q = _q.Pointer, k = _k.Pointer, v = _v.Pointer;
            if (T == 1 && FusedDecodeProjections && L.Wqkv is { } wqkv)
            {
                _matmul.Run(_xb.Pointer, 1, wqkv, _qkv1.Pointer);   // qkv1 = [q | k | v]
                q = _qkv1.Pointer;
                k = q + c.QDim;
                v = k + c.KvDim;
            }
            else _matmul.Run(_xb.Pointer, T, [new(L.Wq, q), new(L.Wk, k), new(L.Wv, v)]);
            prof?.Record(OpKind.QProj, l, ref t0);
            // RoPE on q and k, then each sequence's k and v rows into its cache (spread over the pool for several sequences)
            var segments = _ropeWrite.Run(sequences, l, q, k, v);
            prof?.Record(OpKind.Rope, l, ref t0);
            _attention.Run(q, h, g, hd, segments, _att.Pointer);  // att[T × h·hd], causal within each sequence
            prof?.Record(OpKind.AttnScores, l, ref t0);   // scores, softmax and ·V run fused: timed as one
            _matmul.Run(_att.Pointer, T, L.Wo, _xb2.Pointer);            // xb2[T × d]
            prof?.Record(OpKind.OProj, l, ref t0);
            _rowOps.AddInPlace(_x.Pointer, _xb2.Pointer, (long)T * d);    // x += attention
            prof?.Record(OpKind.AttnResidual, l, ref t0);

            // ── MLP ──
            fixed (float* wn = L.FfnNorm) _rowOps.RmsNorm(_x.Pointer, wn, _xb.Pointer, T, d, (float)c.RmsNormEps);
            prof?.Record(OpKind.FfnNorm, l, ref t0);
            float* gate = _hb.Pointer, up = _hb2.Pointer;
            if (T == 1 && FusedDecodeProjections && L.WgateUp is { } wgu)
            {
                _matmul.Run(_xb.Pointer, 1, wgu, _gateUp1.Pointer);   // gateUp1 = [gate | up]
                gate = _gateUp1.Pointer;
                up = gate + f;
            }
            else _matmul.Run(_xb.Pointer, T, [new(L.Wgate, gate), new(L.Wup, up)]);  // hb[T × f] = gate, hb2[T × f] = up
            prof?.Record(OpKind.Gate, l, ref t0);   // gate and up run as one dispatch: timed as one
            _rowOps.SwiGlu(gate, up, (long)T * f);  // gate = silu(gate)·up
            prof?.Record(OpKind.SwiGlu, l, ref t0);
            _matmul.Run(gate, T, L.Wdown, _xb2.Pointer);  // xb2[T × d]
            prof?.Record(OpKind.Down, l, ref t0);
            _rowOps.AddInPlace(_x.Pointer, _xb2.Pointer, (long)T * d);  // x += MLP
            prof?.Record(OpKind.FfnResidual, l, ref t0);
        }

        // Final norm and LM head, only for the rows that need logits: xb[rows × d] → logits[rows × V]
        int rows;
        fixed (float* wn = _finalNorm)
        {
            if (which == LogitsFor.AllTokens)
            {
                rows = T;
                _rowOps.RmsNorm(_x.Pointer, wn, _xb.Pointer, T, d, (float)c.RmsNormEps);
            }
            else
            {
                rows = sequences.Length;
                int last = -1;
                for (int i = 0; i < sequences.Length; i++)
                {
                    last += sequences[i].Count;
                    Ops.RmsNorm(_x.Pointer + (long)last * d, wn, _xb.Pointer + (long)i * d, 1, d, (float)c.RmsNormEps);
                }
            }
        }
        prof?.Record(OpKind.FinalNorm, -1, ref t0);
        fixed (float* out_ = logits) _matmul.Run(_xb.Pointer, rows, _lmHead, out_);
        if (prof != null)
        {
            prof.Record(OpKind.LmHead, -1, ref t0);
            prof.EndPass();
        }
    }

    private void CheckArguments(ReadOnlySpan<int> tokens, ReadOnlySpan<SequenceSlice> sequences, Span<float> logits, LogitsFor which)
    {
        int T = tokens.Length, V = Config.VocabSize;
        if (T == 0) throw new ArgumentException("no tokens to run", nameof(tokens));
        if (T > MaxTokens) throw new ArgumentException($"{T} tokens in one call exceed this model's batch of {MaxTokens}", nameof(tokens));
        if (sequences.Length == 0) throw new ArgumentException("no sequences", nameof(sequences));
        int total = 0;
        foreach (var s in sequences)
        {
            if (s.Count <= 0) throw new ArgumentException("every sequence in a batch needs at least one token", nameof(sequences));
            if (s.Start < 0 || s.Start + s.Count > Context)
                throw new ArgumentOutOfRangeException(nameof(sequences), $"positions {s.Start}..{s.Start + s.Count - 1} exceed the model's context of {Context} tokens");
            if (s.Start + s.Count > s.Cache.Capacity)
                throw new ArgumentOutOfRangeException(nameof(sequences), $"positions {s.Start}..{s.Start + s.Count - 1} exceed the KV cache capacity of {s.Cache.Capacity}");
            total += s.Count;
        }
        if (total != T) throw new ArgumentException($"the sequences hold {total} tokens but {T} were given", nameof(sequences));
        foreach (int t in tokens)
            if ((uint)t >= (uint)V) throw new ArgumentOutOfRangeException(nameof(tokens), $"token id {t} is outside the vocabulary [0, {V})");
        long need = which == LogitsFor.AllTokens ? (long)T * V : (long)sequences.Length * V;
        if (logits.Length < need) throw new ArgumentException($"logits buffer holds {logits.Length} floats, needs {need}", nameof(logits));
    }

    private static long Aligned(long bytes) => (bytes + 4095) & ~4095L;

    /// <summary>Whether a matrix is quantized at load: Q8 requested and rows a whole number of blocks.</summary>
    private bool Quantizes(TensorView t) => Format == WeightFormat.Q8 && t.DType != DType.U8 && t.Shape[1] % Q8Load.Block == 0;

    /// <summary>Bytes this matrix takes in the arena: its Q8 form, a copy, or nothing when read in place.</summary>
    private long HeldBytes(TensorView t) =>
        Quantizes(t) ? t.Shape[0] * (t.Shape[1] / Q8Load.Block) * Q8Load.BlockBytes
        : _copyWeights ? t.ByteLength : 0;

    private nint Place(long bytes)
    {
        if (_arenaUsed + Aligned(bytes) > _arenaBytes) throw new InvalidOperationException("weight arena overflow");
        var p = (nint)(_arena + _arenaUsed);
        _arenaUsed += Aligned(bytes);
        return p;
    }

    /// <summary>The matrix as the kernels will read it: quantized, copied into the arena, or in place.</summary>
    private WeightMatrix Matrix(TensorView t)
    {
        if (Quantizes(t))
        {
            var stored = new WeightMatrix(t.Pointer, Kind(t.DType), checked((int)t.Shape[0]), checked((int)t.Shape[1]));
            return Quantize(stored, Place(HeldBytes(t)));
        }
        nint data = t.Pointer;
        if (_copyWeights)
        {
            data = Place(t.ByteLength);
            Buffer.MemoryCopy((void*)t.Pointer, (void*)data, t.ByteLength, t.ByteLength);
        }
        if (t.DType == DType.U8)   // already Q8_0 (MiniLlm's export): rows of 36-byte blocks of 32 weights
            return new WeightMatrix(data, WeightType.Q8, checked((int)t.Shape[0]), checked((int)(t.Shape[1] / Q8Load.BlockBytes * Q8Load.Block)));
        return new WeightMatrix(data, Kind(t.DType), checked((int)t.Shape[0]), checked((int)t.Shape[1]));
    }

    /// <summary>Q8_0 copy of a matrix into <paramref name="dst"/>: rows quantized in parallel.</summary>
    private static WeightMatrix Quantize(WeightMatrix src, nint dst)
    {
        long rowBytes = (long)src.Cols / Q8Load.Block * Q8Load.BlockBytes;
        Parallel.For(0, src.Rows, () => new float[src.Cols], (r, _, row) =>
        {
            src.WidenRow(r, row);
            Q8Load.QuantizeRow(row, (byte*)(dst + (nint)(r * rowBytes)));
            return row;
        }, _ => { });
        return new WeightMatrix(dst, WeightType.Q8, src.Rows, src.Cols);
    }

    private static WeightType Kind(DType d) => d switch
    {
        DType.F32 => WeightType.F32,
        DType.BF16 => WeightType.BF16,
        DType.F16 => WeightType.F16,
        _ => throw new ArgumentOutOfRangeException(nameof(d)),
    };

    private static float[] Vector(TensorView t)
    {
        var v = new float[t.ElementCount];
        for (int i = 0; i < v.Length; i++) v[i] = t.GetFloat(i);
        return v;
    }

    public void Dispose()
    {
        _pool.Dispose();
        foreach (var b in new[] { _x, _xb, _xb2, _q, _k, _v, _att, _hb, _hb2, _qkv1, _gateUp1 }) b.Dispose();
        _tp?.Dispose();
        LargePages.Free(_arena);
        _arena = null;
        _owned?.Dispose();
    }
}
