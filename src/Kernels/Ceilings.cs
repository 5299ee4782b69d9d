using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace MiniLlm.Kernels;

/// <summary>One cache level as the OS reports it.</summary>
public sealed record CacheLevel(string Name, long Bytes, string Source);

/// <summary>Read bandwidth with a given working set (per all threads together).</summary>
public sealed record BandwidthPoint(string Level, long WorkingSetBytes, double GBps);

/// <summary>
/// This machine's roofs, measured in-process: peak fp32 FMA throughput and sustained read bandwidth from DRAM,
/// plus read bandwidth out of each cache level. Medians of several repetitions.
/// </summary>
public sealed record Roofline
{
    public required string Cpu { get; init; }
    public required int Threads { get; init; }
    public required string Isa { get; init; }
    /// <summary>Peak fp32 GFLOP/s (an FMA counts 2 FLOPs), all threads.</summary>
    public required double PeakGflops { get; init; }
    /// <summary>Sustained DRAM read bandwidth, GB/s (10⁹ bytes), all threads.</summary>
    public required double BandwidthGBps { get; init; }
    public required IReadOnlyList<BandwidthPoint> CacheBandwidth { get; init; }
    public required IReadOnlyList<CacheLevel> Caches { get; init; }
    public required long DramBufferBytes { get; init; }
    public required int Reps { get; init; }
    public required DateTime MeasuredUtc { get; init; }

    /// <summary>FLOP/byte above which a kernel is compute-bound on this machine.</summary>
    [JsonIgnore] public double Ridge => PeakGflops / BandwidthGBps;

    /// <summary>
    /// Bytes of last-level cache a model's weights can be served from: the L3 the OS reports, capped at 32 MiB
    /// because guests often report a host-wide or bogus figure (508 MiB on this project's VMs, whose L3 is 32 MiB).
    /// The one rule bench and profile use to say "read from cache, not DRAM".
    /// </summary>
    [JsonIgnore] public long LastLevelCacheBytes => Ceilings.LastLevelCacheBytesOf(Caches);

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower };

    public static string DefaultPath => Path.Combine(
        Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache", "minillm", "roofline.json");

    public void Save(string path)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        File.WriteAllText(path, JsonSerializer.Serialize(this, Json));
    }

    public static Roofline? TryLoad(string path)
    {
        if (!File.Exists(path)) return null;
        try { return JsonSerializer.Deserialize<Roofline>(File.ReadAllText(path), Json); }
        catch (JsonException) { return null; }
    }
}

/// <summary>
/// Measures the roofs, on dedicated threads started per measurement — except <see cref="ReadProbe.Measure(WorkerPool)"/>,
/// which benchmarks time on their kernel pool between repetitions.
/// </summary>
public static unsafe class Ceilings
{
    private static volatile float _sink;

    /// <summary>
    /// Runs <paramref name="body"/>(thread index) on <paramref name="threads"/> threads at once — the caller is
    /// thread 0 — and returns the wall seconds from the start signal to the last finish. Helpers spin on the
    /// start and finish flags instead of blocking: with as many threads as cores, a waiting caller or a sleeping
    /// helper's wake-up would otherwise be timed (milliseconds against a 256 MiB pass of 4 ms).
    /// </summary>
    private static double Together(int threads, Action<int> body)
    {
        int ready = 0, go = 0, done = 0;
        var ts = new Thread[threads - 1];
        for (int i = 0; i < ts.Length; i++)
        {
            int id = i + 1;
            ts[i] = new Thread(() =>
            {
                Interlocked.Increment(ref ready);
                while (Volatile.Read(ref go) == 0) Thread.SpinWait(16);
                body(id);
                Interlocked.Increment(ref done);
            }) { IsBackground = true };
            ts[i].Start();
        }
        while (Volatile.Read(ref ready) != ts.Length) Thread.Yield();
        var sw = Stopwatch.StartNew();
        Volatile.Write(ref go, 1);
        body(0);
        while (Volatile.Read(ref done) != ts.Length) Thread.SpinWait(16);
        double s = sw.Elapsed.TotalSeconds;
        foreach (var t in ts) t.Join();
        return s;
    }

    /// <summary>This machine's last-level cache (see <see cref="LastLevelCacheBytesOf"/>), detected once.</summary>
    public static long LastLevelCacheBytes => _llc ??= LastLevelCacheBytesOf(DetectCaches());
    private static long? _llc;

    /// <summary>The L3 of a cache list, capped at 32 MiB (see <see cref="Roofline.LastLevelCacheBytes"/>), 32 MiB when none is reported.</summary>
    public static long LastLevelCacheBytesOf(IEnumerable<CacheLevel> caches) =>
        Math.Min(32L << 20, caches.Where(c => c.Name == "L3").Select(c => c.Bytes).DefaultIfEmpty(32L << 20).Max());

    /// <summary>Median of <paramref name="v"/> (mean of the middle two for an even count); sorts it in place.</summary>
    public static double Median(List<double> v)
    {
        v.Sort();
        return v.Count % 2 == 1 ? v[v.Count / 2] : (v[v.Count / 2 - 1] + v[v.Count / 2]) / 2;
    }

    /// <summary>Peak GFLOP/s: 12 independent FMA chains per thread in registers (enough to cover FMA latency × issue width).</summary>
    public static double MeasureFmaPeak(int threads, int reps = 5, long iterations = 20_000_000)
    {
        int width = Vector512.IsHardwareAccelerated ? 16 : Vector256.IsHardwareAccelerated ? 8 : 1;
        FmaLoop(1000, width); // JIT
        var times = new List<double>();
        for (int r = 0; r < reps; r++)
            times.Add(Together(threads, _ => FmaLoop(iterations, width)));
        double flops = (double)threads * iterations * 12 * width * 2;
        return flops / Median(times) / 1e9;
    }

    private static void FmaLoop(long n, int width)
    {
        if (width == 16) _sink = FmaChains<Simd512, Vector512<float>>(n);
        else if (width == 8) _sink = FmaChains<Simd256, Vector256<float>>(n);
        else
        {
            float c = 1e-7f;
            for (long i = 0; i < n * 12; i++) c = MathF.FusedMultiplyAdd(c, 0.9999999f, 1e-7f);
            _sink = c;
        }
    }

    /// <summary>12 independent FMA chains in registers, n steps each (one width, specialised by the JIT).</summary>
    private static float FmaChains<S, TV>(long n) where S : ISimd<TV> where TV : struct
    {
        var m = S.Broadcast(0.9999999f);
        var a = S.Broadcast(1e-7f);
        TV c0 = a, c1 = a, c2 = a, c3 = a, c4 = a, c5 = a, c6 = a, c7 = a, c8 = a, c9 = a, c10 = a, c11 = a;
        for (long i = 0; i < n; i++)
        {
            c0 = S.Fma(c0, m, a); c1 = S.Fma(c1, m, a); c2 = S.Fma(c2, m, a); c3 = S.Fma(c3, m, a);
            c4 = S.Fma(c4, m, a); c5 = S.Fma(c5, m, a); c6 = S.Fma(c6, m, a); c7 = S.Fma(c7, m, a);
            c8 = S.Fma(c8, m, a); c9 = S.Fma(c9, m, a); c10 = S.Fma(c10, m, a); c11 = S.Fma(c11, m, a);
        }
        var sum = S.Add(S.Add(S.Add(c0, c1), S.Add(c2, c3)), S.Add(S.Add(c4, c5), S.Add(c6, c7)));
        return S.Sum(S.Add(sum, S.Add(S.Add(c8, c9), S.Add(c10, c11))));
    }

    /// <summary>
    /// Read bandwidth in GB/s: each thread streams its own slice of a <paramref name="bytes"/> buffer,
    /// <paramref name="passes"/> times (several passes for working sets that fit a cache).
    /// </summary>
    public static double MeasureReadBandwidth(int threads, long bytes, int reps = 5, int passes = 1)
    {
        using var probe = new ReadProbe(threads, bytes);
        var rates = new List<double>();
        for (int r = 0; r < reps; r++) rates.Add(probe.Measure(passes));
        return Median(rates);
    }

    /// <summary>
    /// The read-bandwidth probe as an object: the buffer is allocated and placed once, so a benchmark can time the
    /// probe between its own repetitions (same minute, same pages) instead of trusting one taken earlier.
    /// </summary>
    public sealed class ReadProbe : IDisposable
    {
        private readonly int _threads;
        private readonly long _floats, _per;
        private float* _buf;

        public ReadProbe(int threads, long bytes)
        {
            if (threads < 1) throw new ArgumentOutOfRangeException(nameof(threads), "threads must be at least 1");
            _threads = threads;
            _floats = Math.Max(64L * threads, bytes / 4 / (64 * threads) * (64 * threads));
            _buf = (float*)LargePages.Alloc((nuint)_floats * 4);   // the pages the weights live on
            _per = _floats / threads;
            float* buf = _buf;
            long per = _per;
            // Touch every page from the thread that will read it (first-touch placement), with non-zero data.
            Together(threads, t => { for (long i = 0; i < per; i += int.MaxValue) new Span<float>(buf + t * per + i, (int)Math.Min(per - i, int.MaxValue)).Fill(1f); });
            ReadSlice(buf, Math.Min(per, 4096)); // JIT
        }

        public long Bytes => _floats * 4;

        /// <summary>
        /// One timed run: every thread streams its slice <paramref name="passes"/> times, as two interleaved streams
        /// (its halves side by side). One stream per thread read 5–15 % less than two on this host's DRAM, so the
        /// GEMV, which reads two or four, beat a one-stream "ceiling"; a ceiling is the fastest read found. GB/s.
        /// </summary>
        public double Measure(int passes = 1)
        {
            ObjectDisposedException.ThrowIf(_buf == null, this);
            float* buf = _buf;
            long per = _per;
            double s = Together(_threads, t => { for (int p = 0; p < passes; p++) _sink = ReadTwoStreams(buf + t * per, per); });
            return (double)_floats * 4 * passes / s / 1e9;
        }

        /// <summary>
        /// One pass on a kernel pool's own threads (one slice per chunk), for timing between kernel repetitions:
        /// fresh probe threads would share the cores with the pool's still-spinning workers.
        /// </summary>
        public double Measure(WorkerPool pool)
        {
            ObjectDisposedException.ThrowIf(_buf == null, this);
            var job = new SliceJob(_buf, _floats / pool.Threads);
            var sw = Stopwatch.StartNew();
            pool.Run(job, pool.Threads);
            return (double)job.Per * pool.Threads * 4 / sw.Elapsed.TotalSeconds / 1e9;
        }

        private sealed class SliceJob(float* buf, long per) : ParallelJob
        {
            public long Per => per;
            public override void Execute(int chunk, int worker) => _sink = ReadTwoStreams(buf + chunk * per, per);
        }

        public void Dispose()
        {
            if (_buf != null) LargePages.Free(_buf);
            _buf = null;
        }
    }

    internal static float ReadSlice(float* p, long n) => Vector512.IsHardwareAccelerated
        ? ReadSlice<Simd512, Vector512<float>>(p, n)
        : ReadSlice<Simd256, Vector256<float>>(p, n);

    /// <summary>Sums n floats with four independent accumulators (the loads are the point, the sum is the sink).</summary>
    private static float ReadSlice<S, TV>(float* p, long n) where S : ISimd<TV> where TV : struct
    {
        int w = S.Width;
        TV a0 = S.Zero, a1 = S.Zero, a2 = S.Zero, a3 = S.Zero;
        long i = 0;
        for (; i + 4 * w <= n; i += 4 * w)
        {
            a0 = S.Add(a0, S.Load(p + i)); a1 = S.Add(a1, S.Load(p + i + w));
            a2 = S.Add(a2, S.Load(p + i + 2 * w)); a3 = S.Add(a3, S.Load(p + i + 3 * w));
        }
        float s = S.Sum(S.Add(S.Add(a0, a1), S.Add(a2, a3)));
        for (; i < n; i++) s += p[i];
        return s;
    }

    /// <summary>
    /// Loads floats [0, n) of a region as two interleaved streams (its halves side by side), the way the GEMV reads a
    /// chunk's rows i and h + i; the return value is only a sink.
    /// </summary>
    internal static float ReadTwoStreams(float* p, long n)
    {
        long half = n / 2 / 64 * 64;
        if (!Vector512.IsHardwareAccelerated || half == 0) return ReadSlice(p, n);
        float* q = p + half;
        Vector512<float> a0 = default, a1 = default, b0 = default, b1 = default;
        for (long i = 0; i < half; i += 32)
        {
            a0 += Vector512.Load(p + i); b0 += Vector512.Load(q + i);
            a1 += Vector512.Load(p + i + 16); b1 += Vector512.Load(q + i + 16);
        }
        return Vector512.Sum(a0 + a1 + (b0 + b1)) + ReadSlice(q + half, n - 2 * half);
    }

    /// <summary>
    /// Loads floats [0, n) as four interleaved streams (its quarters side by side), the way the bf16 GEMV reads a
    /// chunk's rows i, q + i, 2q + i and 3q + i; the return value is only a sink.
    /// </summary>
    internal static float ReadFourStreams(float* p, long n)
    {
        long quarter = n / 4 / 16 * 16;
        if (!Vector512.IsHardwareAccelerated || quarter == 0) return ReadTwoStreams(p, n);
        float* q = p + quarter, r = q + quarter, s = r + quarter;
        Vector512<float> a = default, b = default, c = default, d = default;
        for (long i = 0; i < quarter; i += 16)
        {
            a += Vector512.Load(p + i); b += Vector512.Load(q + i);
            c += Vector512.Load(r + i); d += Vector512.Load(s + i);
        }
        return Vector512.Sum(a + b + (c + d)) + ReadSlice(s + quarter, n - 4 * quarter);
    }

    /// <summary>Data cache sizes: sysfs first, then glibc's view of cpuid (getconf), each tagged with where it came from.</summary>
    public static List<CacheLevel> DetectCaches()
    {
        var levels = new List<CacheLevel>();
        const string sys = "/sys/devices/system/cpu/cpu0/cache";
        if (Directory.Exists(sys))
        {
            foreach (var d in Directory.GetDirectories(sys, "index*").Order())
            {
                try
                {
                    string type = File.ReadAllText(Path.Combine(d, "type")).Trim();
                    if (type == "Instruction") continue;
                    string level = File.ReadAllText(Path.Combine(d, "level")).Trim();
                    levels.Add(new CacheLevel("L" + level, ParseSize(File.ReadAllText(Path.Combine(d, "size")).Trim()), "sysfs"));
                }
                catch (IOException) { }
            }
            if (levels.Count > 0) return levels;
        }
        try
        {
            var psi = new ProcessStartInfo("getconf", "-a") { RedirectStandardOutput = true, UseShellExecute = false };
            using var p = Process.Start(psi)!;
            string all = p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            foreach (var (key, name) in new[] { ("LEVEL1_DCACHE_SIZE", "L1"), ("LEVEL2_CACHE_SIZE", "L2"), ("LEVEL3_CACHE_SIZE", "L3") })
                foreach (var line in all.Split('\n'))
                {
                    var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                    if (parts.Length == 2 && parts[0] == key && long.TryParse(parts[1], out long b) && b > 0)
                        levels.Add(new CacheLevel(name, b, "getconf (cpuid)"));
                }
        }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException) { }
        return levels;
    }

    private static long ParseSize(string s)
    {
        long mult = 1;
        if (s.EndsWith('K')) { mult = 1024; s = s[..^1]; }
        else if (s.EndsWith('M')) { mult = 1024 * 1024; s = s[..^1]; }
        return long.Parse(s) * mult;
    }

    /// <summary>Everything: FMA peak, DRAM bandwidth (buffer 8× the LLC, clamped to [256 MiB, 1 GiB]) and each cache level.</summary>
    public static Roofline Measure(int threads, int reps = 5, Action<string>? progress = null)
    {
        var caches = DetectCaches();
        long llc = caches.Count > 0 ? caches.Max(c => c.Bytes) : 32L << 20;
        long dram = Math.Clamp(8 * llc, 256L << 20, 1L << 30);
        progress?.Invoke("FMA peak");
        double peak = MeasureFmaPeak(threads, reps);
        progress?.Invoke($"DRAM read bandwidth ({dram >> 20} MiB buffer)");
        double bw = MeasureReadBandwidth(threads, dram, reps);
        var points = new List<BandwidthPoint>();
        foreach (var c in caches)
        {
            // Half of the level (per core for L1/L2, shared for L3) so the working set surely fits.
            long ws = c.Name is "L1" or "L2" ? c.Bytes / 2 * threads : Math.Min(c.Bytes / 2, 16L << 20);
            int passes = (int)Math.Clamp((2L << 30) / ws, 1, 20000);
            progress?.Invoke($"{c.Name} read bandwidth ({ws >> 10} KiB working set)");
            points.Add(new BandwidthPoint(c.Name, ws, MeasureReadBandwidth(threads, ws, reps, passes)));
        }
        return new Roofline
        {
            Cpu = CpuName(),
            Threads = threads,
            Isa = SimdPolicy.Best.ToString(),
            PeakGflops = peak,
            BandwidthGBps = bw,
            CacheBandwidth = points,
            Caches = caches,
            DramBufferBytes = dram,
            Reps = reps,
            MeasuredUtc = DateTime.UtcNow,
        };
    }

    public static string CpuName()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/cpuinfo"))
                if (line.StartsWith("model name", StringComparison.Ordinal)) return line[(line.IndexOf(':') + 1)..].Trim();
        }
        catch (IOException) { }
        return RuntimeInformation.ProcessArchitecture.ToString();
    }
}
