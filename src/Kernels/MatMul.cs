using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MiniLlm.Kernels;

/// <summary>
/// Y[M×N] = X[M×K] · Wᵀ with W [N×K] in its stored type (F32/BF16/F16, widened in registers).
/// Work is cut into (row block of X) × (panel of W rows) tiles handed to the worker pool. Inside a tile a 4×4
/// register tile (4 rows of X against 4 rows of W, 16 accumulators) walks K one vector at a time, so each
/// W panel is streamed once per X row block and, for M = 1, every weight byte is read exactly once.
/// </summary>
public sealed unsafe class MatMul : ParallelJob
{
    private const int RowBlock = 64;            // X rows per tile: 64×K fp32 stays in L2 while a W panel streams
    internal const long SerialMacs = 1 << 15;    // below this much work, threads cost more than they save

    private readonly WorkerPool _pool;
    private float* _x, _y;
    private WeightMatrix _w;
    private int _m, _panel, _nPanels, _mBlocks;

    private readonly PackedGemm _packed;
    private readonly SkinnyGemm _skinny;
    private bool _invariant;
    private bool _int8Dot;
    private float _streamSink;
    private sbyte* _xq;              // Q8 GEMV with int8 activations: x quantized per block of 32 …
    private float* _xScale;          // … and each block's scale
    private int _xqLength;

    /// <summary>
    /// Q8 GEMV with activations quantized to int8 per block of 32 (as llama.cpp does), so AVX-VNNI's vpdpbusd
    /// multiplies and sums 32 int8 pairs per instruction; otherwise int8 weights are widened to fp32 against fp32 x.
    /// </summary>
    public bool Q8Int8Activations { get; set; }
    private float* _xPairs;          // GEMV over bf16: x regrouped per 32 as [16 even | 16 odd]
    private int _xPairsLength;

    /// <summary>
    /// GEMVs (M = 1) only load their weight rows, with no arithmetic and nothing written to Y: every chunk, thread
    /// and dispatch exactly as a real call. Measures the memory ceiling of the engine's own access pattern (a
    /// decode step's weights cut into its ops and chunks) beside the one long stream of a bandwidth probe.
    /// </summary>
    public bool StreamOnly { get; set; }

    /// <summary>From this many rows on, the packed outer-product GEMM beats the dot-product tiles.</summary>
    /// <remarks>
    /// Measured (weights from DRAM, interleaved): at M = 32–48 the skinny tiles match or beat the packed GEMM in fp32
    /// and took 20–35 % less time in bf16 (whose packed kernel then widened every broadcast weight alone); at 64 packed
    /// fp32 wins. Fuller panels below 64 rows go to the packed GEMM too (<see cref="UsePacked"/>).
    /// </remarks>
    public static int PackedMinRows { get; set; } = 64;

    /// <summary>
    /// Whether M rows go to the packed GEMM: from <see cref="PackedMinRows"/>, and for fp32 and bf16 weights also
    /// whenever its 32-row X panels would be at least 90 % full (M = 29–32, 58–63), or at 13–16 rows its 16-row panel
    /// (<see cref="PackedNarrow"/>). With its next-slice prefetch, packed fp32 at M = 32 ran at 70–74 % of FMA peak
    /// against the skinny tiles' 67–71 % (interleaved, 768 × 2048 from DRAM); at M = 48 (a 64-row panel, a quarter
    /// empty) it lost 55–60 % to 68–73 %. At 29–31 rows it also wins: stories110m's products from DRAM took 10–11 % less
    /// time (M = 29, 31), tiny-kjv's from cache 16 % less (M = 29; a 29-token prefill); at 24 (three quarters full) it
    /// took 4 % more, at 40 (two panels, 62 % full) 18 % more (session 12, in-process alternation, 9–31 rounds).
    /// </summary>
    /// <remarks>
    /// bf16 weights follow the same rule since the packed kernel widens them in registers (PackedGemm.MicroBf16):
    /// at M = 29–32, in-process alternation (both orders, 9 rounds), stories110m-bf16 b32 decode steps took 0.878 and
    /// 0.887 (1 / 1.128) of the skinny tiles' time, b30 0.902 and 0.907; tiny-kjv-bf16 (weights in the cache) b32
    /// 0.844 and 0.84, a 29-token prefill 0.865 and 0.837. Before, with each 8-row slice widened into a buffer first,
    /// bf16 kept the tiles below 64 rows (the packed GEMM 4–12 % slower at 60 and below).
    /// </remarks>
    private bool UsePacked(int m, ReadOnlySpan<Product> products, SimdPolicy.Isa isa)
    {
        if (isa == SimdPolicy.Isa.Scalar || BatchInvariant) return false;
        if (m >= PackedMinRows) return true;
        if (isa != SimdPolicy.Isa.V512 || !(All(products, WeightType.F32) || All(products, WeightType.BF16))) return false;
        int panel = PackedGemm.PanelRows(m, products, isa);
        if (panel == 16) return PackedNarrow && !CacheResidentWeights && m >= PackedNarrowMinRows;
        return m * 10 >= (m + panel - 1) / panel * panel * 9;   // panels at least 90 % full
    }

    private static bool All(ReadOnlySpan<Product> products, WeightType type)
    {
        foreach (var p in products) if (p.W.Type != type) return false;
        return true;
    }

    /// <summary>
    /// Y size (M × N × 4 bytes) from which the skinny kernel's 5–8-row streams park their sums and write Y in runs,
    /// instead of from every tile (see SkinnyGemm.StreamTiles): below it Y stays in L1 and direct stores cost nothing.
    /// </summary>
    public static long SkinnyBufferedSumsMinYBytes { get; set; } = 64 << 10;

    /// <summary>Batched decode (2 ≤ M &lt; <see cref="PackedMinRows"/>) through <see cref="SkinnyGemm"/>; off = the 4×4 tiles.</summary>
    public static bool UseSkinny { get; set; } = true;

    /// <summary>
    /// fp32 skinny GEMM over more than 8 rows with K in one block: each 8-row group runs the M ≤ 8 kernel's three
    /// long weight streams over the whole chunk in turn (on), instead of 8 × 3 tiles of adjacent rows group after
    /// group (off, for A/B runs). stories110m decode from DRAM, alternating in one process, medians of per-round
    /// ratios of the step time: b10 0.90, b12 0.86, b16 0.89 and 0.94, b24 0.93 and 0.97. bf16 weights keep the
    /// tiles (b16–b48 1.00–1.02 with the streams); so does K over 1024, where the streams (8 rows of X no longer
    /// in L1) made a 2048-column product 8–12 % slower.
    /// </summary>
    public static bool SkinnyStreamGroups { get; set; } = true;

    /// <summary>
    /// fp32 and bf16 weights from DRAM at 13–16 rows (<see cref="PackedNarrowMinRows"/>) go to the packed GEMM with one
    /// 16-row X panel (session 16: one X vector against 8 broadcast fp32 weights; session 17: k pairs, fp32 and bf16,
    /// see PackedGemm.MicroPairs and MicroPairsBf16) instead of the skinny tiles' two 8-row groups, the second
    /// re-reading each piece from L2 while DRAM idles: one pass streams each weight once with all 16 rows' arithmetic
    /// behind it. Session 16's figures: stories110m-f32 decode, in-process alternation: b16 0.952, 0.933 and (order
    /// reversed) 0.921 of the step time, b15 0.976 and 0.981, a 16-token prefill 0.958 and 0.944; the products alone at
    /// M = 16 0.966 and 0.990, M = 14 (a panel 12 % empty, not taken then) 0.979, M = 12 1.128. Off for weights in the
    /// cache (tiny-kjv b15/b16 and its 16-token prefill 1.19–1.23: from L2/L3 the skinny tiles are faster) and, in
    /// session 16, bf16 (1.58: the packed kernel widened each 8-row slice into a buffer first). Off = the skinny tiles
    /// (A/B runs).
    /// </summary>
    public static bool PackedNarrow { get; set; } = true;

    /// <summary>
    /// From this many rows the 16-row panel (<see cref="PackedNarrow"/>) is taken: with its k-pair kernel, stories110m-f32
    /// decode steps at b13 and b14 took 0.84–0.85 of the skinny tiles' time (in-process alternation, both orders), b12
    /// 0.96 and 1.02, b10 0.98 and 1.01; stories110m-bf16 b13 0.97 and 0.96, b14 0.92 and 0.99. tiny-kjv, from the cache, stays on the tiles (b14, b16 and a 16-token
    /// prefill within ±4 % either way).
    /// </summary>
    private const int PackedNarrowMinRows = 13;

    private static void CheckQ8(ReadOnlySpan<Product> products)
    {
        foreach (var p in products)
            if (p.W.Type == WeightType.Q8 && p.W.Cols % Q8Load.Block != 0) throw new ArgumentException($"Q8 weights need K a multiple of {Q8Load.Block}, got {p.W.Cols}", nameof(products));
    }

    /// <summary>While the 4×4 tiles work on one weight panel, prefetch the next panel's bytes at the same offsets.</summary>
    public static bool PrefetchNextPanel { get; set; } = true;

    /// <summary>
    /// Smallest GEMV chunk: every chunk starts two new streams whose first lines arrive at full latency, so a
    /// chunk must be long enough to pay that back (16 KiB chunks of a cache-resident 128×256 matrix took 1.5× the
    /// time of 64 KiB ones).
    /// </summary>
    public const int GemvMinChunkBytes = 64 << 10;

    /// <summary>
    /// The weights are served from the last-level cache (the model is smaller than it). GEMVs over rows of at most
    /// <see cref="ShortRowMax"/> weights then take 16 adjacent rows at a time with one shuffle-tree sum (tiny-kjv
    /// decode 11–12 % faster in fp32 and bf16), and the bf16 GEMV does not prefetch. From DRAM those 16 rows are 16
    /// short streams: stories110m-bf16 decode took 1.5× as long with them, fp32 no less time, so they stay off.
    /// </summary>
    public bool CacheResidentWeights { get; set; }

    /// <summary>
    /// How far ahead in each of its four rows the bf16 GEMV asks for lines, when the weights come from DRAM. Chunks of a decode step's
    /// small matrices are short streams the hardware prefetcher barely ramps up on, and the bf16 loop's shift, mask
    /// and two FMAs a line leave fewer loads in the out-of-order window than fp32's one FMA: stories110m-bf16 decode
    /// took 6–12 % less time a step with 1.5–2 KiB than with none (harness, interleaved); fp32 gained nothing from it
    /// (session 21: 1–3 KiB made its decode step 8–13 % slower). Which distance is best depends on the host: 2 KiB
    /// beat 1 KiB by 3–11 % a step in 6 of 7 pairs when it was chosen; in session 21, 1–1.5 KiB beat 2 KiB by 3–5 %
    /// and prefetching into L2 only (prefetcht1, t2) cost 6–9 %. So a model measures its own
    /// (<see cref="Bf16GemvPrefetchCandidates"/>, LlamaModel.TuneGemvPrefetch). Weights served from the cache want it
    /// off (tiny-kjv-bf16 decode: 11 % slower with it): see <see cref="CacheResidentWeights"/>.
    /// Rows of 8 KiB and more (K ≥ 4096) want it nearer, <see cref="Bf16GemvPrefetchBytesLongRows"/>.
    /// </summary>
    public int Bf16GemvPrefetchBytes
    {
        get => _bf16PrefetchBytes;
        set => _bf16PrefetchBytes = value >= 0 && value % 64 == 0 ? value : throw new ArgumentOutOfRangeException(nameof(value), $"a prefetch distance is a multiple of 64 bytes, ≥ 0 (got {value})");
    }
    private int _bf16PrefetchBytes = 1536;

    /// <summary>The distances a model tries for <see cref="Bf16GemvPrefetchBytes"/>.</summary>
    public static ReadOnlySpan<int> Bf16GemvPrefetchCandidates => [1024, 1536, 2048];

    /// <summary>
    /// The bf16 GEMV's prefetch distance over rows of at least 8 KiB. From DRAM, kernel harness, alternating runs, two
    /// rounds: 4096 × 4096 read 64–68 GB/s at 1 KiB against 59–62 at 2 KiB (0.5, 0.75, 1.5, 3 and 4 KiB all lower),
    /// 8192 × 2048 62–65 against 57–61; but 768 × 32768 took 72–73 at 2 KiB against 65–66 at 1 KiB, 2048 × 8192 65–70
    /// against 60–65, and stories110m-bf16 decode (K = 768 and 2048) was 3–11 % faster a step at 2 KiB in 6 of 7 pairs.
    /// </summary>
    private const int Bf16GemvPrefetchBytesLongRows = 1024;

    /// <summary>Fewest rows in a GEMV chunk (a multiple of 4): <see cref="GemvMinChunkBytes"/> of weights.</summary>
    private static int GemvMinRows(long rowBytes) =>
        (int)Math.Min(int.MaxValue & ~3, Math.Max(4, (GemvMinChunkBytes + rowBytes - 1) / Math.Max(1, rowBytes) + 3 & ~3));

    /// <summary>
    /// Every output element is summed in the same order whatever M is (the dot-product tiles for all sizes, no
    /// packed GEMM, no multi-accumulator GEMV), so a sequence's logits do not depend on what it is batched with.
    /// Slower for prefill; for checks and reproducible serving.
    /// </summary>
    public bool BatchInvariant { get; set; }

    public MatMul(WorkerPool pool)
    {
        _pool = pool;
        _packed = new PackedGemm(pool);
        _skinny = new SkinnyGemm(pool);
    }

    /// <summary>One weight and where its product goes: Y [m × W.Rows], its rows <see cref="Ldy"/> floats apart.</summary>
    public readonly struct Product(WeightMatrix w, float* y, int ldy = 0)
    {
        public readonly WeightMatrix W = w;
        public readonly float* Y = y;
        /// <summary>Floats from one row of Y to the next: W.Rows, or more where Y is a column block of a wider matrix (<see cref="SliceGemm"/> only).</summary>
        public readonly int Ldy = ldy == 0 ? w.Rows : ldy;
    }

    /// <summary>
    /// Several products of the same X (q/k/v, or gate/up): X is packed once and, for prefill, all run in one
    /// dispatch. Every W must have X's column count.
    /// </summary>
    public void Run(float* x, int m, ReadOnlySpan<Product> products)
    {
        if (m <= 0 || products.IsEmpty) return;
        int k = products[0].W.Cols;
        foreach (var p in products)
        {
            if (p.W.Cols != k) throw new ArgumentException($"weights of one group must share K (got {p.W.Cols} and {k})", nameof(products));
            if (p.Ldy != p.W.Rows || p.W.RowBytes != p.W.BytesOf(k)) throw new ArgumentException("MatMul takes whole matrices and Y of W.Rows columns; blocks go to SliceGemm", nameof(products));
        }
        var isa = SimdPolicy.Current;
        if (UsePacked(m, products, isa)) _packed.Run(x, m, k, products, isa);
        else if (m >= 2 && UseSkinny && isa != SimdPolicy.Isa.Scalar && !BatchInvariant) { CheckQ8(products); _skinny.Run(x, m, k, products, isa); }
        else if (m == 1 && !BatchInvariant) RunGemv(x, k, products);
        else foreach (var p in products) Run(x, m, p.W, p.Y);
    }

    private readonly ProductChunks _group = new();

    /// <summary>
    /// One or several GEMVs on one x in a single dispatch: the rows of all the weights are cut into one guided list
    /// of chunks, so small projections (q, k, v) do not each pay a launch and a cold start.
    /// </summary>
    private void RunGemv(float* x, int k, ReadOnlySpan<Product> products)
    {
        long macs = 0;
        foreach (var p in products) macs += (long)p.W.Rows * k;
        CheckQ8(products);
        bool bf16 = false, q8 = false;
        foreach (var p in products)
        {
            bf16 |= p.W.Type == WeightType.BF16;
            q8 |= p.W.Type == WeightType.Q8;
        }
        // Weights in the cache: every thread takes the same rows every call, so each core's cache keeps its share.
        bool pinned = CacheResidentWeights && PinCacheResidentGemv;
        bool split = !pinned && SplitDramGemv && _pool.Threads == 2 && macs >= SerialMacs && AllRowsAligned(products, SplitAlign);
        double firstShare = 0;
        int chunks = pinned ? _group.SetPinned(products, _pool.Threads, 16)
            : split ? _group.SetSplit(products, _split.Share, SplitAlign, out firstShare)
            : _group.SetGuided(products, GemvMinRows(products[0].W.RowBytes), _pool.Threads);
        var isa = SimdPolicy.Current;
        _x = x; _m = 1; _invariant = false;
        if (bf16 && isa == SimdPolicy.Isa.V512) PairX(x, k);
        _int8Dot = q8 && Q8Int8Activations && AvxVnni.IsSupported && isa != SimdPolicy.Isa.Scalar;
        if (_int8Dot) QuantizeX(x, k);
        try
        {
            if (macs < SerialMacs) for (int c = 0; c < chunks; c++) Execute(c, 0);
            else if (pinned) _pool.RunPinned(this, chunks);
            else if (split) _split.Run(_pool, this, chunks, firstShare);
            else _pool.Run(this, chunks);
        }
        finally { _group.Clear(); }
    }

    /// <summary>
    /// A GEMV from DRAM on two threads cuts every product once, at a split that follows the two cores' speeds
    /// (<see cref="TwoWaySplit"/>). One chunk a thread starts its weight streams
    /// once per product; the guided chunks (large first, 64 KiB last, the next free thread taking each) start them
    /// ~10 times a product and fetch every index from a counter line the other core wrote. Fixed halves instead took
    /// 0.91–0.99 of the guided step's time in some minutes and 1.01–1.06 in others (stories110m decode, batch 1,
    /// in-process alternation): the host's two vCPUs are not always equally fast. Off = the guided chunks.
    /// </summary>
    public static bool SplitDramGemv { get; set; } = true;

    /// <summary>The same two-way split for the skinny GEMM's 2–8 rows (instead of 8 chunks a call from a counter). Off = the chunks.</summary>
    public static bool SplitSkinny { get; set; } = true;

    /// <summary>… and for 9 rows and more, each half in pieces that stay in L2 for the next 8-row group.</summary>
    public static bool SplitSkinnyGroups { get; set; } = true;

    /// <summary>The same two-way split for the packed GEMM (instead of 32-row chunks from a counter). Off = the chunks.</summary>
    public static bool SplitPacked { get; set; } = true;

    /// <summary>
    /// Split points are multiples of this many rows (and split GEMVs need every product's rows to be one), so every
    /// chunk fills the kernels' 4- and 16-row groups whatever the split: a row's sum never depends on the timing.
    /// </summary>
    private const int SplitAlign = 64;

    private readonly TwoWaySplit _split = new();

    /// <summary>Worker 0's share of the rows of the next split GEMV (<see cref="SplitDramGemv"/>), 0.25–0.75; settable so
    /// tests and harnesses can pin it.</summary>
    public double SplitShare { get => _split.Share; set => _split.Share = value; }

    /// <summary>The same for the skinny GEMM's split calls (<see cref="SplitSkinny"/>).</summary>
    public double SkinnySplitShare { get => _skinny.SplitShare; set => _skinny.SplitShare = value; }

    /// <summary>The same for the packed GEMM's split calls (<see cref="SplitPacked"/>).</summary>
    public double PackedSplitShare { get => _packed.SplitShare; set => _packed.SplitShare = value; }

    private static bool AllRowsAligned(ReadOnlySpan<Product> products, int align)
    {
        foreach (var p in products) if (p.W.Rows % align != 0) return false;
        return true;
    }

    /// <summary>Y = X·Wᵀ. x: [m × w.Cols] row-major, y: [m × w.Rows] row-major.</summary>
    public void Run(float* x, int m, in WeightMatrix w, float* y)
    {
        if (m <= 0) return;
        var isa = SimdPolicy.Current;
        if (w.Type == WeightType.Q8 && w.Cols % Q8Load.Block != 0) throw new ArgumentException($"Q8 weights need K a multiple of {Q8Load.Block}, got {w.Cols}", nameof(w));
        if (UsePacked(m, [new Product(w, y)], isa))
        {
            _packed.Run(x, m, w.Cols, [new Product(w, y)], isa);
            return;
        }
        if (m >= 2 && UseSkinny && isa != SimdPolicy.Isa.Scalar && !BatchInvariant)
        {
            _skinny.Run(x, m, w.Cols, [new Product(w, y)], isa);
            return;
        }
        if (m == 1 && !BatchInvariant)
        {
            RunGemv(x, w.Cols, [new Product(w, y)]);
            return;
        }
        _x = x; _y = y; _w = w; _m = m;
        _invariant = BatchInvariant;
        _int8Dot = false;
        int threads = _pool.Threads;
        long macs = (long)m * w.Rows * w.Cols;
        _mBlocks = (m + RowBlock - 1) / RowBlock;
        // Enough W panels that every thread gets several chunks (load balance), each a multiple of 4 rows.
        int wanted = macs < SerialMacs ? 1 : Math.Max(1, 4 * threads / _mBlocks);
        _panel = Math.Max(4, (w.Rows + wanted - 1) / wanted + 3 & ~3);
        _nPanels = (w.Rows + _panel - 1) / _panel;
        if (macs < SerialMacs) { for (int c = 0; c < _mBlocks * _nPanels; c++) Execute(c, 0); }
        else _pool.Run(this, _mBlocks * _nPanels);
    }

    /// <summary>Whether <see cref="GemvSlice"/> takes weights of this type with this ISA.</summary>
    public static bool SliceSupported(WeightType type) =>
        SimdPolicy.Current == SimdPolicy.Isa.V512 && type is WeightType.F32 or WeightType.BF16;

    /// <summary>
    /// y[n] = Σ_{k∈[c0,c1)} W[n,k]·x[k] for rows n0..n1, on the calling thread: one thread's share of a GEMV cut by
    /// rows (c0 = 0, c1 = K) or by columns (all rows, a slice of K; the caller adds the threads' partial y). fp32 or
    /// bf16 weights, V512, c0 and c1 multiples of 32. <paramref name="pairs"/>: c1 − c0 floats of scratch (bf16).
    /// </summary>
    public static void GemvSlice(float* x, in WeightMatrix w, int n0, int n1, int c0, int c1, float* y, float* pairs)
    {
        if (!SliceSupported(w.Type) || c0 % 32 != 0 || c1 % 32 != 0 || c0 < 0 || c1 > w.Cols || c0 >= c1 || n0 < 0 || n1 > w.Rows)
            throw new ArgumentException($"GemvSlice takes fp32/bf16 weights with V512 and a column slice on multiples of 32 (got {w.Type}, {SimdPolicy.Current}, rows {n0}..{n1} of {w.Rows}, columns {c0}..{c1} of {w.Cols})");
        int len = c1 - c0, n = n0;
        if (w.Type == WeightType.F32)
        {
            float* xs = x + c0;
            for (; n + 16 <= n1; n += 16) DotF32x16(xs, (float*)w.Row(n) + c0, len, w.Cols, y + n);
            for (; n + 2 <= n1; n += 2) DotF32x2(xs, (float*)w.Row(n) + c0, (float*)w.Row(n + 1) + c0, len, y + n, y + n + 1);
            if (n < n1) DotF32x2(xs, (float*)w.Row(n) + c0, (float*)w.Row(n) + c0, len, y + n, y + n);
            return;
        }
        PairX(x + c0, len, pairs);
        for (; n + 16 <= n1; n += 16) DotBf16x16(pairs, w.Row(n) + 2 * c0, len, (nint)w.RowBytes, y + n);
        for (; n < n1; n++) y[n] = DotBf16Pairs(pairs, x + c0, w.Row(n) + 2 * c0, len);
    }

    /// <summary>
    /// The bytes <see cref="GemvSlice"/> reads for these rows and columns, in its order (16 rows side by side, a
    /// line of each per step), with loads only: the stream ceiling beside a run. The return value is only a sink.
    /// </summary>
    public static float StreamSlice(in WeightMatrix w, int n0, int n1, int c0, int c1)
    {
        long elementBytes = w.RowBytes / w.Cols, sliceBytes = (c1 - c0) * elementBytes;
        float sink = 0;
        int n = n0;
        for (; n + 16 <= n1; n += 16) sink += ReadRows16((byte*)w.Row(n) + c0 * elementBytes, w.RowBytes, sliceBytes);
        for (; n < n1; n++) sink += Ceilings.ReadSlice((float*)((byte*)w.Row(n) + c0 * elementBytes), sliceBytes / sizeof(float));
        return sink;
    }

    /// <summary>Loads <paramref name="bytes"/> (a multiple of 64) of each of 16 rows, a line of every row per step.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float ReadRows16(byte* w, long rowBytes, long bytes)
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
        for (long o = 0; o < bytes; o += 64)
        {
            byte* r = w + o;
            a0 += Vector512.Load((float*)r) + Vector512.Load((float*)(r + rowBytes)) + Vector512.Load((float*)(r + 2 * rowBytes)) + Vector512.Load((float*)(r + 3 * rowBytes));
            r += 4 * rowBytes;
            a1 += Vector512.Load((float*)r) + Vector512.Load((float*)(r + rowBytes)) + Vector512.Load((float*)(r + 2 * rowBytes)) + Vector512.Load((float*)(r + 3 * rowBytes));
            r += 4 * rowBytes;
            a2 += Vector512.Load((float*)r) + Vector512.Load((float*)(r + rowBytes)) + Vector512.Load((float*)(r + 2 * rowBytes)) + Vector512.Load((float*)(r + 3 * rowBytes));
            r += 4 * rowBytes;
            a3 += Vector512.Load((float*)r) + Vector512.Load((float*)(r + rowBytes)) + Vector512.Load((float*)(r + 2 * rowBytes)) + Vector512.Load((float*)(r + 3 * rowBytes));
        }
        return Vector512.Sum((a0 + a1) + (a2 + a3));
    }

    /// <summary>
    /// bf16 GEMV trick: 32 bf16 weights loaded as 16 uint32 are the even elements in their low halves and the odd
    /// ones in their high halves, so (w &lt;&lt; 16) and (w &amp; 0xFFFF0000) are both fp32 vectors with no shuffle.
    /// x is regrouped once per call to match: per block of 32, its 16 even then its 16 odd elements.
    /// </summary>
    private void PairX(float* x, int k)
    {
        if (_xPairsLength < k)
        {
            if (_xPairs != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_xPairs);
            _xPairs = (float*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)k * sizeof(float), 64);
            _xPairsLength = k;
        }
        PairX(x, k, _xPairs);
    }

    private static void PairX(float* x, int k, float* pairs)
    {
        int blocks = k / 32, b = 0;
        // Two two-source permutes a block. The scalar loop took ~1 µs per 768 floats on the calling thread, before
        // the dispatch, while the other thread waited: 2 % of the samples of stories110m-bf16 decode's GEMVs (perf).
        // The step took 0.987 and 0.983 of the time with the permutes (in-process alternation, 2 × 15 rounds).
        if (Avx512F.IsSupported)
        {
            var even = Vector512.Create(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            var odd = even + Vector512<int>.One;
            for (; b < blocks; b++)
            {
                var lo = Vector512.Load(x + b * 32);
                var hi = Vector512.Load(x + b * 32 + 16);
                Avx512F.PermuteVar16x32x2(lo, even, hi).Store(pairs + b * 32);
                Avx512F.PermuteVar16x32x2(lo, odd, hi).Store(pairs + b * 32 + 16);
            }
        }
        for (; b < blocks; b++)
            for (int i = 0; i < 16; i++)
            {
                pairs[b * 32 + i] = x[b * 32 + 2 * i];
                pairs[b * 32 + 16 + i] = x[b * 32 + 2 * i + 1];
            }
    }

    /// <summary>
    /// row · x for a Q8_0 row: per block, 32 int8 widened to fp32 in registers against x, the block's partial sum
    /// scaled once. Two blocks in flight for independent chains.
    /// </summary>
    private static float DotQ8(float* x, nint row, int K)
    {
        byte* b = (byte*)row;
        Vector512<float> a0 = default, a1 = default;
        int k = 0;
        for (; k + 64 <= K; k += 64, b += 2 * Q8Load.BlockBytes)
        {
            var p0 = Vector512.ConvertToSingle(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)(b + 4)))) * Vector512.Load(x + k);
            p0 = Vector512.FusedMultiplyAdd(Vector512.ConvertToSingle(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)(b + 20)))), Vector512.Load(x + k + 16), p0);
            a0 = Vector512.FusedMultiplyAdd(p0, Vector512.Create(*(float*)b), a0);
            byte* c = b + Q8Load.BlockBytes;
            var p1 = Vector512.ConvertToSingle(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)(c + 4)))) * Vector512.Load(x + k + 32);
            p1 = Vector512.FusedMultiplyAdd(Vector512.ConvertToSingle(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)(c + 20)))), Vector512.Load(x + k + 48), p1);
            a1 = Vector512.FusedMultiplyAdd(p1, Vector512.Create(*(float*)c), a1);
        }
        for (; k < K; k += 32, b += Q8Load.BlockBytes)
        {
            var p0 = Vector512.ConvertToSingle(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)(b + 4)))) * Vector512.Load(x + k);
            p0 = Vector512.FusedMultiplyAdd(Vector512.ConvertToSingle(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)(b + 20)))), Vector512.Load(x + k + 16), p0);
            a0 = Vector512.FusedMultiplyAdd(p0, Vector512.Create(*(float*)b), a0);
        }
        return Vector512.Sum(a0 + a1);
    }

    /// <summary>x → int8 per block of 32 with scale max|x|/127 (round to nearest), once per GEMV call.</summary>
    private void QuantizeX(float* x, int k)
    {
        if (_xqLength < k)
        {
            if (_xq != null) { System.Runtime.InteropServices.NativeMemory.AlignedFree(_xq); System.Runtime.InteropServices.NativeMemory.AlignedFree(_xScale); }
            _xq = (sbyte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)k, 64);
            _xScale = (float*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)(k / Q8Load.Block + 1) * sizeof(float), 64);
            _xqLength = k;
        }
        for (int b = 0; b < k / Q8Load.Block; b++)
            _xScale[b] = Q8Load.QuantizeBlock(new ReadOnlySpan<float>(x + b * Q8Load.Block, Q8Load.Block), _xq + b * Q8Load.Block);
    }

    /// <summary>
    /// row · x with both in int8: per block, vpdpbusd on |xq| (unsigned) against wq carrying xq's sign (vpsignb),
    /// eight int32 partial sums converted once and scaled by (weight scale · x scale).
    /// </summary>
    private static float DotQ8Int8(sbyte* xq, float* xScale, nint row, int K)
    {
        byte* b = (byte*)row;
        Vector256<float> acc0 = default, acc1 = default;
        int blocks = K / Q8Load.Block, i = 0;
        for (; i + 1 < blocks; i += 2, b += 2 * Q8Load.BlockBytes)
        {
            var x0 = Vector256.Load(xq + i * 32);
            var s0 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Avx2.Abs(x0), Avx2.Sign(Vector256.Load((sbyte*)(b + 4)), x0));
            acc0 = Vector256.FusedMultiplyAdd(Vector256.ConvertToSingle(s0), Vector256.Create(*(float*)b * xScale[i]), acc0);
            byte* c = b + Q8Load.BlockBytes;
            var x1 = Vector256.Load(xq + i * 32 + 32);
            var s1 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Avx2.Abs(x1), Avx2.Sign(Vector256.Load((sbyte*)(c + 4)), x1));
            acc1 = Vector256.FusedMultiplyAdd(Vector256.ConvertToSingle(s1), Vector256.Create(*(float*)c * xScale[i + 1]), acc1);
        }
        for (; i < blocks; i++, b += Q8Load.BlockBytes)
        {
            var x0 = Vector256.Load(xq + i * 32);
            var s0 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Avx2.Abs(x0), Avx2.Sign(Vector256.Load((sbyte*)(b + 4)), x0));
            acc0 = Vector256.FusedMultiplyAdd(Vector256.ConvertToSingle(s0), Vector256.Create(*(float*)b * xScale[i]), acc0);
        }
        return Vector256.Sum(acc0 + acc1);
    }

    /// <summary>row · x for a bf16 row, using the paired x from <see cref="PairX"/>.</summary>
    private static float DotBf16Pairs(float* xPairs, float* x, nint row, int K)
    {
        var hi = Vector512.Create(0xFFFF0000u);
        Vector512<float> e0 = default, o0 = default, e1 = default, o1 = default;
        int k = 0;
        for (; k + 64 <= K; k += 64)
        {
            var w0 = Vector512.Load((uint*)((ushort*)row + k));
            var w1 = Vector512.Load((uint*)((ushort*)row + k + 32));
            e0 = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(w0, 16).AsSingle(), Vector512.Load(xPairs + k), e0);
            o0 = Vector512.FusedMultiplyAdd((w0 & hi).AsSingle(), Vector512.Load(xPairs + k + 16), o0);
            e1 = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(w1, 16).AsSingle(), Vector512.Load(xPairs + k + 32), e1);
            o1 = Vector512.FusedMultiplyAdd((w1 & hi).AsSingle(), Vector512.Load(xPairs + k + 48), o1);
        }
        for (; k + 32 <= K; k += 32)
        {
            var w0 = Vector512.Load((uint*)((ushort*)row + k));
            e0 = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(w0, 16).AsSingle(), Vector512.Load(xPairs + k), e0);
            o0 = Vector512.FusedMultiplyAdd((w0 & hi).AsSingle(), Vector512.Load(xPairs + k + 16), o0);
        }
        float s = Vector512.Sum((e0 + o0) + (e1 + o1));
        for (; k < K; k++) s = MathF.FusedMultiplyAdd(x[k], Bf16Load.Load1(row, k), s);
        return s;
    }

    /// <summary>
    /// Two fp32 rows · x, two accumulator chains each. Written on raw pointers rather than through the generic
    /// tiles: the index arithmetic of the generic loop cost 3–5 % of the GEMV's bandwidth.
    /// </summary>
    private static void DotF32x2(float* x, float* a, float* b, int K, float* ya, float* yb)
    {
        int body = K & ~15;
        DotF32x2Vec(x, a, b, body, out var va, out var vb);
        float sa = Vector512.Sum(va), sb = Vector512.Sum(vb);
        for (int k = body; k < K; k++)
        {
            sa = MathF.FusedMultiplyAdd(x[k], a[k], sa);
            sb = MathF.FusedMultiplyAdd(x[k], b[k], sb);
        }
        *ya = sa; *yb = sb;
    }

    /// <summary>
    /// The fp32 GEMV from DRAM (rows under <see cref="F32FourStreamMinCols"/>, K a multiple of 16) parks each row's
    /// vector of partial sums and reduces 16 rows with one shuffle tree (<see cref="GemvF32Parked"/>) instead of a
    /// horizontal sum per row; off = <see cref="DotF32x2"/> row pair by row pair (for A/B measurements).
    /// </summary>
    public static bool GemvParkedSums { get; set; } = true;

    /// <summary>
    /// With <see cref="CacheResidentWeights"/>, a GEMV gives each thread the same rows on every call (a pinned
    /// dispatch) instead of handing chunks to whichever thread is free. Public so harnesses can compare the two.
    /// </summary>
    public static bool PinCacheResidentGemv { get; set; } = true;

    /// <summary>Two fp32 rows · x (K a multiple of 16) left as vectors: each lane a partial sum.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void DotF32x2Vec(float* x, float* a, float* b, int K, out Vector512<float> sa, out Vector512<float> sb)
    {
        Vector512<float> c0 = default, c1 = default, d0 = default, d1 = default;
        int k = 0;
        for (; k + 32 <= K; k += 32)
        {
            var x0 = Vector512.Load(x + k);
            var x1 = Vector512.Load(x + k + 16);
            c0 = Vector512.FusedMultiplyAdd(x0, Vector512.Load(a + k), c0);
            d0 = Vector512.FusedMultiplyAdd(x0, Vector512.Load(b + k), d0);
            c1 = Vector512.FusedMultiplyAdd(x1, Vector512.Load(a + k + 16), c1);
            d1 = Vector512.FusedMultiplyAdd(x1, Vector512.Load(b + k + 16), d1);
        }
        if (k < K)
        {
            var x0 = Vector512.Load(x + k);
            c0 = Vector512.FusedMultiplyAdd(x0, Vector512.Load(a + k), c0);
            d0 = Vector512.FusedMultiplyAdd(x0, Vector512.Load(b + k), d0);
        }
        sa = c0 + c1; sb = d0 + d1;
    }

    /// <summary>
    /// GEMV rows n0..n1 as two streams (row i beside row h + i), each row's sum left as a vector and parked; every
    /// 16 rows one shuffle tree per stream turns 16 parked vectors into 16 sums, stored as one vector. A horizontal
    /// sum costs ~25 instructions a row, ~20 % of the loop's own over a 768-weight row, and each one waits on its
    /// row's last load; the tree costs ~3 a row off that path. Measured against the row-pair kernel, alternating:
    /// stories110m decode 1.7–3.3 % less time a step (2 × 21 × 32 steps), one thread over its products 1.5–3 %.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void GemvF32Parked(float* x, float* w, int K, int n0, int n1, float* y)
    {
        int h = (n1 - n0) / 2;
        var pa = stackalloc Vector512<float>[16];
        var pb = stackalloc Vector512<float>[16];
        int i = 0;
        for (; i + 16 <= h; i += 16)
        {
            float* a = w + (long)(n0 + i) * K, b = w + (long)(n0 + h + i) * K;
            for (int j = 0; j < 16; j++, a += K, b += K) DotF32x2Vec(x, a, b, K, out pa[j], out pb[j]);
            SumTree512.Sums16(pa[0], pa[1], pa[2], pa[3], pa[4], pa[5], pa[6], pa[7], pa[8], pa[9], pa[10], pa[11], pa[12], pa[13], pa[14], pa[15]).Store(y + n0 + i);
            SumTree512.Sums16(pb[0], pb[1], pb[2], pb[3], pb[4], pb[5], pb[6], pb[7], pb[8], pb[9], pb[10], pb[11], pb[12], pb[13], pb[14], pb[15]).Store(y + n0 + h + i);
        }
        for (; i < h; i++) DotF32x2(x, w + (long)(n0 + i) * K, w + (long)(n0 + h + i) * K, K, y + n0 + i, y + n0 + h + i);
        if (((n1 - n0) & 1) != 0) DotF32x2(x, w + (long)(n1 - 1) * K, w + (long)(n1 - 1) * K, K, y + n1 - 1, y + n1 - 1);
    }

    /// <summary>
    /// Rows at least this long (16 KiB of fp32) take the GEMV's four-stream kernel. From DRAM, kernel harness,
    /// alternating runs: 4096 × 4096 read 77–80 GB/s with four streams against 65–67 with two (three rounds),
    /// 5632 × 2816 71–73 against 66–67; 8192 × 2048 the same within noise; but 768 × 16384 67–69 against 71–75 and
    /// 2048 × 8192 60–66 against 70–73, so shorter rows keep two.
    /// </summary>
    private const int F32FourStreamMinCols = 4096;

    /// <summary>Four fp32 rows · x (K a multiple of 16), one 64-byte line of each per step: four weight streams.</summary>
    private static void DotF32x4(float* x, float* a, float* b, float* c, float* d, int K, float* ya, float* yb, float* yc, float* yd)
    {
        Vector512<float> ca = default, cb = default, cc = default, cd = default;
        for (int k = 0; k < K; k += 16)
        {
            var xv = Vector512.Load(x + k);
            ca = Vector512.FusedMultiplyAdd(xv, Vector512.Load(a + k), ca);
            cb = Vector512.FusedMultiplyAdd(xv, Vector512.Load(b + k), cb);
            cc = Vector512.FusedMultiplyAdd(xv, Vector512.Load(c + k), cc);
            cd = Vector512.FusedMultiplyAdd(xv, Vector512.Load(d + k), cd);
        }
        var sums = SumTree512.Sums4(ca, cb, cc, cd);   // as in DotBf16Pairs4
        *ya = sums.ToScalar(); *yb = sums.GetElement(1); *yc = sums.GetElement(2); *yd = sums.GetElement(3);
    }

    /// <summary>Two bf16 rows · x (paired x), one 64-byte line of each row per step: two weight streams.</summary>
    private static void DotBf16Pairs2(float* xPairs, float* x, nint a, nint b, int K, float* ya, float* yb)
    {
        var hi = Vector512.Create(0xFFFF0000u);
        Vector512<float> ea = default, oa = default, eb = default, ob = default;
        int k = 0;
        for (; k + 32 <= K; k += 32)
        {
            var xe = Vector512.Load(xPairs + k);
            var xo = Vector512.Load(xPairs + k + 16);
            var wa = Vector512.Load((uint*)((ushort*)a + k));
            var wb = Vector512.Load((uint*)((ushort*)b + k));
            ea = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(wa, 16).AsSingle(), xe, ea);
            eb = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(wb, 16).AsSingle(), xe, eb);
            oa = Vector512.FusedMultiplyAdd((wa & hi).AsSingle(), xo, oa);
            ob = Vector512.FusedMultiplyAdd((wb & hi).AsSingle(), xo, ob);
        }
        float sa = Vector512.Sum(ea + oa), sb = Vector512.Sum(eb + ob);
        for (; k < K; k++)
        {
            sa = MathF.FusedMultiplyAdd(x[k], Bf16Load.Load1(a, k), sa);
            sb = MathF.FusedMultiplyAdd(x[k], Bf16Load.Load1(b, k), sb);
        }
        *ya = sa; *yb = sb;
    }

    /// <summary>Longest GEMV row (in weights) that the 16-row tiles take when <see cref="CacheResidentWeights"/>.</summary>
    public const int ShortRowMax = 1024;

    /// <summary>
    /// 16 adjacent fp32 rows · x, one accumulator each, summed by one shuffle tree and stored as one vector into
    /// y[0..16). For rows of ≤ 1024 weights: the two-row kernel spends a horizontal sum (~10 instructions) per
    /// 16–64 FMAs there; the tree spends ~3 per row. tiny-kjv decode (K = 256/768, weights in L3) took 11–12 % less
    /// time a token (harness, interleaved); stories110m (K = 768 from DRAM) the same as with two rows.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotF32x16(float* x, float* w, int K, float* y) => DotF32x16(x, w, K, K, y);

    /// <summary>The same over K weights of each of 16 rows <paramref name="stride"/> floats apart (a column slice).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotF32x16(float* x, float* w, int K, int stride, float* y)
    {
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, c4 = default, c5 = default, c6 = default, c7 = default;
        Vector512<float> c8 = default, c9 = default, c10 = default, c11 = default, c12 = default, c13 = default, c14 = default, c15 = default;
        for (int k = 0; k < K; k += 16)
        {
            var xv = Vector512.Load(x + k);
            float* r = w + k;
            c0 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c0); r += stride;
            c1 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c1); r += stride;
            c2 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c2); r += stride;
            c3 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c3); r += stride;
            c4 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c4); r += stride;
            c5 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c5); r += stride;
            c6 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c6); r += stride;
            c7 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c7); r += stride;
            c8 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c8); r += stride;
            c9 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c9); r += stride;
            c10 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c10); r += stride;
            c11 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c11); r += stride;
            c12 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c12); r += stride;
            c13 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c13); r += stride;
            c14 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c14); r += stride;
            c15 = Vector512.FusedMultiplyAdd(xv, Vector512.Load(r), c15);
        }
        SumTree512.Sums16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15).Store(y);
    }

    /// <summary>
    /// 16 adjacent bf16 rows · x (paired x, K a multiple of 32), one accumulator each taking the even and the odd
    /// products in turn (16 independent chains cover the FMA latency), summed by one shuffle tree into y[0..16).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotBf16x16(float* xPairs, nint w, int K, float* y) => DotBf16x16(xPairs, w, K, 2 * K, y);

    /// <summary>The same over K weights of each of 16 rows <paramref name="rowBytes"/> apart (a column slice).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotBf16x16(float* xPairs, nint w, int K, nint rowBytes, float* y)
    {
        var hi = Vector512.Create(0xFFFF0000u);
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, c4 = default, c5 = default, c6 = default, c7 = default;
        Vector512<float> c8 = default, c9 = default, c10 = default, c11 = default, c12 = default, c13 = default, c14 = default, c15 = default;
        for (int k = 0; k < K; k += 32)
        {
            var xe = Vector512.Load(xPairs + k);
            var xo = Vector512.Load(xPairs + k + 16);
            byte* r = (byte*)w + 2 * k;
            c0 = Bf16Step(r, xe, xo, hi, c0); r += rowBytes;
            c1 = Bf16Step(r, xe, xo, hi, c1); r += rowBytes;
            c2 = Bf16Step(r, xe, xo, hi, c2); r += rowBytes;
            c3 = Bf16Step(r, xe, xo, hi, c3); r += rowBytes;
            c4 = Bf16Step(r, xe, xo, hi, c4); r += rowBytes;
            c5 = Bf16Step(r, xe, xo, hi, c5); r += rowBytes;
            c6 = Bf16Step(r, xe, xo, hi, c6); r += rowBytes;
            c7 = Bf16Step(r, xe, xo, hi, c7); r += rowBytes;
            c8 = Bf16Step(r, xe, xo, hi, c8); r += rowBytes;
            c9 = Bf16Step(r, xe, xo, hi, c9); r += rowBytes;
            c10 = Bf16Step(r, xe, xo, hi, c10); r += rowBytes;
            c11 = Bf16Step(r, xe, xo, hi, c11); r += rowBytes;
            c12 = Bf16Step(r, xe, xo, hi, c12); r += rowBytes;
            c13 = Bf16Step(r, xe, xo, hi, c13); r += rowBytes;
            c14 = Bf16Step(r, xe, xo, hi, c14); r += rowBytes;
            c15 = Bf16Step(r, xe, xo, hi, c15);
        }
        SumTree512.Sums16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15).Store(y);
    }

    /// <summary>One 64-byte line (32 bf16) of a row against the paired x: even products, then odd, into c.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Bf16Step(byte* r, Vector512<float> xe, Vector512<float> xo, Vector512<uint> hi, Vector512<float> c)
    {
        var wv = Vector512.Load((uint*)r);
        c = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(wv, 16).AsSingle(), xe, c);
        return Vector512.FusedMultiplyAdd((wv & hi).AsSingle(), xo, c);
    }

    /// <summary>
    /// Four bf16 rows · x (paired x), one 64-byte line of each row per step: four weight streams. Rows of a length
    /// not a multiple of 32 fall back to the two-row pair for their tails.
    /// </summary>
    private void DotBf16Pairs4(float* xPairs, nint a, nint b, nint c, nint d, int K, float* ya, float* yb, float* yc, float* yd)
    {
        if (K % 32 != 0)
        {
            DotBf16Pairs2(xPairs, _x, a, b, K, ya, yb);
            DotBf16Pairs2(xPairs, _x, c, d, K, yc, yd);
            return;
        }
        var hi = Vector512.Create(0xFFFF0000u);
        Vector512<float> ea = default, oa = default, eb = default, ob = default, ec = default, oc = default, ed = default, od = default;
        // prefetch never faults: lines past the matrix's end are harmless
        int pf = CacheResidentWeights ? 0 : 2 * K >= 8192 ? Bf16GemvPrefetchBytesLongRows : _bf16PrefetchBytes;
        for (int k = 0; k < K; k += 32)
        {
            if (pf != 0)
            {
                Sse.Prefetch0((byte*)a + 2 * k + pf); Sse.Prefetch0((byte*)b + 2 * k + pf);
                Sse.Prefetch0((byte*)c + 2 * k + pf); Sse.Prefetch0((byte*)d + 2 * k + pf);
            }
            var xe = Vector512.Load(xPairs + k);
            var xo = Vector512.Load(xPairs + k + 16);
            var wa = Vector512.Load((uint*)((ushort*)a + k));
            var wb = Vector512.Load((uint*)((ushort*)b + k));
            var wc = Vector512.Load((uint*)((ushort*)c + k));
            var wd = Vector512.Load((uint*)((ushort*)d + k));
            ea = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(wa, 16).AsSingle(), xe, ea);
            eb = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(wb, 16).AsSingle(), xe, eb);
            ec = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(wc, 16).AsSingle(), xe, ec);
            ed = Vector512.FusedMultiplyAdd(Vector512.ShiftLeft(wd, 16).AsSingle(), xe, ed);
            oa = Vector512.FusedMultiplyAdd((wa & hi).AsSingle(), xo, oa);
            ob = Vector512.FusedMultiplyAdd((wb & hi).AsSingle(), xo, ob);
            oc = Vector512.FusedMultiplyAdd((wc & hi).AsSingle(), xo, oc);
            od = Vector512.FusedMultiplyAdd((wd & hi).AsSingle(), xo, od);
        }
        // One shuffle tree for the four sums: four Vector512.Sum calls (~130 instructions every 24 lines at K = 768)
        // cost stories110m-bf16 decode 3 % a step (in-process alternation, 15 rounds × 128 steps: 0.970, quartiles
        // 0.955–0.980); in a kernel harness the loads-only loop with four such sums read 11 % slower than with one.
        var sums = SumTree512.Sums4(ea + oa, eb + ob, ec + oc, ed + od);
        *ya = sums.ToScalar(); *yb = sums.GetElement(1); *yc = sums.GetElement(2); *yd = sums.GetElement(3);
    }

    public override void Execute(int chunk, int worker)
    {
        if (_group.Count > 0)
        {
            var p = _group.Guided(chunk, out int r0, out int r1);
            Rows(p.W, p.Y, 0, 1, r0, r1);
            _split.ChunkDone(worker);
            return;
        }
        int mb = chunk % _mBlocks, nb = chunk / _mBlocks;
        int m0 = mb * RowBlock, m1 = Math.Min(_m, m0 + RowBlock);
        int n0 = nb * _panel, n1 = Math.Min(_w.Rows, n0 + _panel);
        Rows(_w, _y, m0, m1, n0, n1);
    }

    /// <summary>Y rows m0..m1 × columns n0..n1 of X·Wᵀ, by the kernel for W's type and this call's shape.</summary>
    private void Rows(in WeightMatrix w, float* y, int m0, int m1, int n0, int n1)
    {
        if (StreamOnly && _m == 1)
        {
            long floats = (long)(n1 - n0) * w.RowBytes / sizeof(float);
            _streamSink += w.Type == WeightType.BF16 ? Ceilings.ReadFourStreams((float*)w.Row(n0), floats) : Ceilings.ReadTwoStreams((float*)w.Row(n0), floats);
            return;
        }
        switch (w.Type)
        {
            case WeightType.F32 when _m == 1 && SimdPolicy.Current == SimdPolicy.Isa.V512 && !_invariant && CacheResidentWeights && w.Cols <= ShortRowMax && w.Cols % 16 == 0:
            {
                int n = n0;
                for (; n + 16 <= n1; n += 16) DotF32x16((float*)_x, (float*)w.Row(n), w.Cols, y + n);
                for (; n + 2 <= n1; n += 2) DotF32x2(_x, (float*)w.Row(n), (float*)w.Row(n + 1), w.Cols, y + n, y + n + 1);
                if (n < n1) DotF32x2(_x, (float*)w.Row(n), (float*)w.Row(n), w.Cols, y + n, y + n);
                break;
            }
            case WeightType.F32 when _m == 1 && SimdPolicy.Current == SimdPolicy.Isa.V512 && !_invariant:
            {
                if (w.Cols >= F32FourStreamMinCols && w.Cols % 16 == 0)
                {
                    // Four streams per thread over long rows: rows i, q + i, 2q + i, 3q + i of the chunk.
                    int q = (n1 - n0) / 4;
                    for (int i = 0; i < q; i++)
                        DotF32x4((float*)_x, (float*)w.Row(n0 + i), (float*)w.Row(n0 + q + i), (float*)w.Row(n0 + 2 * q + i), (float*)w.Row(n0 + 3 * q + i), w.Cols,
                            y + n0 + i, y + n0 + q + i, y + n0 + 2 * q + i, y + n0 + 3 * q + i);
                    for (int r = n0 + 4 * q; r < n1; r++) DotF32x2(_x, (float*)w.Row(r), (float*)w.Row(r), w.Cols, y + r, y + r);
                    break;
                }
                if (GemvParkedSums && w.Cols % 16 == 0) { GemvF32Parked((float*)_x, (float*)w.Pointer, w.Cols, n0, n1, y); break; }
                // Two streams per thread: row i beside row h + i of the chunk (one stream left 15–30 % unused).
                int h = (n1 - n0) / 2;
                for (int i = 0; i < h; i++) DotF32x2(_x, (float*)w.Row(n0 + i), (float*)w.Row(n0 + h + i), w.Cols, y + n0 + i, y + n0 + h + i);
                if (((n1 - n0) & 1) != 0) DotF32x2(_x, (float*)w.Row(n1 - 1), (float*)w.Row(n1 - 1), w.Cols, y + n1 - 1, y + n1 - 1);
                break;
            }
            case WeightType.F32: Tile<F32Load>(w, y, m0, m1, n0, n1); break;
            case WeightType.BF16 when _m == 1 && SimdPolicy.Current == SimdPolicy.Isa.V512 && !_invariant && CacheResidentWeights && w.Cols <= ShortRowMax && w.Cols % 32 == 0:
            {
                int n = n0;
                for (; n + 16 <= n1; n += 16) DotBf16x16(_xPairs, w.Row(n), w.Cols, y + n);
                for (; n < n1; n++) y[n] = DotBf16Pairs(_xPairs, _x, w.Row(n), w.Cols);
                break;
            }
            case WeightType.BF16 when _m == 1 && SimdPolicy.Current == SimdPolicy.Isa.V512 && !_invariant:
            {
                // Four streams per thread: rows i, q + i, 2q + i, 3q + i of the chunk. Half the bytes per weight of
                // fp32 means twice the work per line, and two streams left 10–15 % of the DRAM read rate unused
                // where fp32's two did not (kernel harness, 8 × 32 MiB, interleaved: 4 streams 54–72 GB/s, 2 streams
                // 47–62, the two-stream probe 50–70).
                int q = (n1 - n0) / 4;
                for (int i = 0; i < q; i++)
                    DotBf16Pairs4(_xPairs, w.Row(n0 + i), w.Row(n0 + q + i), w.Row(n0 + 2 * q + i), w.Row(n0 + 3 * q + i), w.Cols,
                        y + n0 + i, y + n0 + q + i, y + n0 + 2 * q + i, y + n0 + 3 * q + i);
                for (int r = n0 + 4 * q; r < n1; r++) y[r] = DotBf16Pairs(_xPairs, _x, w.Row(r), w.Cols);
                break;
            }
            case WeightType.BF16: Tile<Bf16Load>(w, y, m0, m1, n0, n1); break;
            case WeightType.F16: Tile<F16Load>(w, y, m0, m1, n0, n1); break;
            case WeightType.Q8 when _int8Dot:
                for (int r = n0; r < n1; r++) y[r] = DotQ8Int8(_xq, _xScale, w.Row(r), w.Cols);
                break;
            case WeightType.Q8 when _m == 1 && SimdPolicy.Current == SimdPolicy.Isa.V512 && Avx512F.IsSupported && !_invariant:
                for (int r = n0; r < n1; r++) y[r] = DotQ8(_x, w.Row(r), w.Cols);
                break;
            case WeightType.Q8: Tile<Q8Load>(w, y, m0, m1, n0, n1); break;
        }
    }

    private void Tile<TL>(in WeightMatrix w, float* y, int m0, int m1, int n0, int n1) where TL : IWeightLoad
    {
        switch (SimdPolicy.Current)
        {
            case SimdPolicy.Isa.V512: Tiles<Simd512, Vector512<float>, TL>.Run(_x, w, y, m0, m1, n0, n1, _invariant); break;
            case SimdPolicy.Isa.V256: Tiles<Simd256, Vector256<float>, TL>.Run(_x, w, y, m0, m1, n0, n1, _invariant); break;
            default: Tiles<Simd256, Vector256<float>, TL>.RunScalar(_x, w, y, m0, m1, n0, n1); break;
        }
    }

    /// <summary>
    /// Asks for the next weight panel's bytes a slice per k-step, spread over one pass of the current panel, so
    /// they arrive while it is being computed. Inactive when the address is 0.
    /// </summary>
    private struct PanelPrefetch(nint address, long bytes, int steps)
    {
        private readonly long _slice = address == 0 ? 0 : Math.Max(64, (bytes + steps - 1) / Math.Max(1, steps) + 63 & ~63L);
        private long _done;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Step()
        {
            if (address == 0 || _done >= bytes) return;
            for (long b = 0; b < _slice; b += 64) Sse.Prefetch0((void*)(address + (nint)(_done + b)));
            _done += _slice;
        }
    }

    private static class Tiles<S, TV, TL> where S : ISimd<TV> where TV : struct where TL : IWeightLoad
    {
        public static void Run(float* x, WeightMatrix w, float* y, int m0, int m1, int n0, int n1, bool invariant)
        {
            int K = w.Cols, N = w.Rows;
            if (m1 - m0 == 1 && !invariant)
            {
                // GEMV: the chunk's two halves side by side, row i with row h + i, so each thread keeps two
                // sequential streams in flight; one stream per thread left 15–30 % of the read bandwidth unused.
                float* xr = x + (long)m0 * K, yr = y + (long)m0 * N;
                int h = (n1 - n0) / 2;
                for (int i = 0; i < h; i++) Dot2(xr, w.Row(n0 + i), w.Row(n0 + h + i), K, yr + n0 + i, yr + n0 + h + i);
                if (((n1 - n0) & 1) != 0) yr[n1 - 1] = Dot4(xr, w.Row(n1 - 1), K);
                return;
            }
            int n = n0;
            for (; n + 4 <= n1; n += 4)
            {
                nint w0 = w.Row(n), w1 = w.Row(n + 1), w2 = w.Row(n + 2), w3 = w.Row(n + 3);
                // The next panel is contiguous after this one: its bytes start where row n+3's end.
                nint next = PrefetchNextPanel && n + 8 <= n1 && Sse.IsSupported ? w.Row(n + 4) : 0;
                long panelBytes = 4 * w.RowBytes;
                int m = m0;
                for (; m + 4 <= m1; m += 4)
                {
                    Tile4x4(x + (long)m * K, K, w0, w1, w2, w3, y + (long)m * N + n, N, next, panelBytes);
                    next = 0;   // the first pass over the panel has asked for the next one
                }
                for (; m < m1; m++)
                {
                    Tile1x4(x + (long)m * K, K, w0, w1, w2, w3, y + (long)m * N + n, next, panelBytes);
                    next = 0;
                }
            }
            for (; n < n1; n++)
                for (int m = m0; m < m1; m++) y[(long)m * N + n] = Dot(x + (long)m * K, w.Row(n), K);
        }

        public static void RunScalar(float* x, WeightMatrix w, float* y, int m0, int m1, int n0, int n1)
        {
            int K = w.Cols, N = w.Rows;
            for (int n = n0; n < n1; n++)
            {
                nint row = w.Row(n);
                for (int m = m0; m < m1; m++)
                {
                    float* xr = x + (long)m * K;
                    float s = 0;
                    for (int k = 0; k < K; k++) s = MathF.FusedMultiplyAdd(xr[k], TL.Load1(row, k), s);
                    y[(long)m * N + n] = s;
                }
            }
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
        private static void Tile4x4(float* x, int K, nint w0, nint w1, nint w2, nint w3, float* y, int ldy, nint prefetch = 0, long prefetchBytes = 0)
        {
            // Spread the next panel's prefetches over this panel's k-steps: one 64-byte line per step.
            var pf = new PanelPrefetch(prefetch, prefetchBytes, K / S.Width);
            TV c00 = S.Zero, c01 = S.Zero, c02 = S.Zero, c03 = S.Zero;
            TV c10 = S.Zero, c11 = S.Zero, c12 = S.Zero, c13 = S.Zero;
            TV c20 = S.Zero, c21 = S.Zero, c22 = S.Zero, c23 = S.Zero;
            TV c30 = S.Zero, c31 = S.Zero, c32 = S.Zero, c33 = S.Zero;
            float* x0 = x, x1 = x + K, x2 = x + 2 * K, x3 = x + 3 * K;
            int W = S.Width, k = 0;
            for (; k + W <= K; k += W)
            {
                pf.Step();
                TV b0 = S.LoadW<TL>(w0, k), b1 = S.LoadW<TL>(w1, k), b2 = S.LoadW<TL>(w2, k), b3 = S.LoadW<TL>(w3, k);
                TV a = S.Load(x0 + k);
                c00 = S.Fma(a, b0, c00); c01 = S.Fma(a, b1, c01); c02 = S.Fma(a, b2, c02); c03 = S.Fma(a, b3, c03);
                a = S.Load(x1 + k);
                c10 = S.Fma(a, b0, c10); c11 = S.Fma(a, b1, c11); c12 = S.Fma(a, b2, c12); c13 = S.Fma(a, b3, c13);
                a = S.Load(x2 + k);
                c20 = S.Fma(a, b0, c20); c21 = S.Fma(a, b1, c21); c22 = S.Fma(a, b2, c22); c23 = S.Fma(a, b3, c23);
                a = S.Load(x3 + k);
                c30 = S.Fma(a, b0, c30); c31 = S.Fma(a, b1, c31); c32 = S.Fma(a, b2, c32); c33 = S.Fma(a, b3, c33);
            }
            y[0] = S.Sum(c00) + Tail(x0, w0, k, K); y[1] = S.Sum(c01) + Tail(x0, w1, k, K); y[2] = S.Sum(c02) + Tail(x0, w2, k, K); y[3] = S.Sum(c03) + Tail(x0, w3, k, K);
            y += ldy;
            y[0] = S.Sum(c10) + Tail(x1, w0, k, K); y[1] = S.Sum(c11) + Tail(x1, w1, k, K); y[2] = S.Sum(c12) + Tail(x1, w2, k, K); y[3] = S.Sum(c13) + Tail(x1, w3, k, K);
            y += ldy;
            y[0] = S.Sum(c20) + Tail(x2, w0, k, K); y[1] = S.Sum(c21) + Tail(x2, w1, k, K); y[2] = S.Sum(c22) + Tail(x2, w2, k, K); y[3] = S.Sum(c23) + Tail(x2, w3, k, K);
            y += ldy;
            y[0] = S.Sum(c30) + Tail(x3, w0, k, K); y[1] = S.Sum(c31) + Tail(x3, w1, k, K); y[2] = S.Sum(c32) + Tail(x3, w2, k, K); y[3] = S.Sum(c33) + Tail(x3, w3, k, K);
        }

        /// <summary>One X row against 4 W rows: the GEMV inner loop, 4 independent accumulator chains.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
        private static void Tile1x4(float* x, int K, nint w0, nint w1, nint w2, nint w3, float* y, nint prefetch = 0, long prefetchBytes = 0)
        {
            TV c0 = S.Zero, c1 = S.Zero, c2 = S.Zero, c3 = S.Zero;
            int W = S.Width, k = 0;
            var pf = new PanelPrefetch(prefetch, prefetchBytes, K / W);
            for (; k + W <= K; k += W)
            {
                pf.Step();
                TV a = S.Load(x + k);
                c0 = S.Fma(a, S.LoadW<TL>(w0, k), c0);
                c1 = S.Fma(a, S.LoadW<TL>(w1, k), c1);
                c2 = S.Fma(a, S.LoadW<TL>(w2, k), c2);
                c3 = S.Fma(a, S.LoadW<TL>(w3, k), c3);
            }
            y[0] = S.Sum(c0) + Tail(x, w0, k, K);
            y[1] = S.Sum(c1) + Tail(x, w1, k, K);
            y[2] = S.Sum(c2) + Tail(x, w2, k, K);
            y[3] = S.Sum(c3) + Tail(x, w3, k, K);
        }

        /// <summary>Two rows · x, two accumulator chains each: two independent weight streams per thread.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
        private static void Dot2(float* x, nint a, nint b, int K, float* ya, float* yb)
        {
            TV c0 = S.Zero, c1 = S.Zero, d0 = S.Zero, d1 = S.Zero;
            int W = S.Width, k = 0;
            for (; k + 2 * W <= K; k += 2 * W)
            {
                TV x0 = S.Load(x + k), x1 = S.Load(x + k + W);
                c0 = S.Fma(x0, S.LoadW<TL>(a, k), c0);
                d0 = S.Fma(x0, S.LoadW<TL>(b, k), d0);
                c1 = S.Fma(x1, S.LoadW<TL>(a, k + W), c1);
                d1 = S.Fma(x1, S.LoadW<TL>(b, k + W), d1);
            }
            for (; k + W <= K; k += W)
            {
                TV x0 = S.Load(x + k);
                c0 = S.Fma(x0, S.LoadW<TL>(a, k), c0);
                d0 = S.Fma(x0, S.LoadW<TL>(b, k), d0);
            }
            *ya = S.Sum(S.Add(c0, c1)) + Tail(x, a, k, K);
            *yb = S.Sum(S.Add(d0, d1)) + Tail(x, b, k, K);
        }

        /// <summary>One row·x with four accumulator chains (hides FMA latency for a single stream).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
        private static float Dot4(float* x, nint w, int K)
        {
            TV c0 = S.Zero, c1 = S.Zero, c2 = S.Zero, c3 = S.Zero;
            int W = S.Width, k = 0;
            for (; k + 4 * W <= K; k += 4 * W)
            {
                c0 = S.Fma(S.Load(x + k), S.LoadW<TL>(w, k), c0);
                c1 = S.Fma(S.Load(x + k + W), S.LoadW<TL>(w, k + W), c1);
                c2 = S.Fma(S.Load(x + k + 2 * W), S.LoadW<TL>(w, k + 2 * W), c2);
                c3 = S.Fma(S.Load(x + k + 3 * W), S.LoadW<TL>(w, k + 3 * W), c3);
            }
            for (; k + W <= K; k += W) c0 = S.Fma(S.Load(x + k), S.LoadW<TL>(w, k), c0);
            return S.Sum(S.Add(S.Add(c0, c1), S.Add(c2, c3))) + Tail(x, w, k, K);
        }

        private static float Dot(float* x, nint w, int K)
        {
            TV c = S.Zero;
            int W = S.Width, k = 0;
            for (; k + W <= K; k += W) c = S.Fma(S.Load(x + k), S.LoadW<TL>(w, k), c);
            return S.Sum(c) + Tail(x, w, k, K);
        }

        /// <summary>The last K mod width elements, in scalar.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static float Tail(float* x, nint w, int k, int K)
        {
            float s = 0;
            for (; k < K; k++) s = MathF.FusedMultiplyAdd(x[k], TL.Load1(w, k), s);
            return s;
        }
    }
}
