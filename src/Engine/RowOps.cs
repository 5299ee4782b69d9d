using MiniLlm.Kernels;

namespace MiniLlm.Engine;

/// <summary>
/// The forward pass's elementwise ops between the GEMMs (RMSNorm, residual add, SwiGLU) over many rows, cut across the
/// pool's threads instead of run on the caller while the other threads spin. Each op is cut at row (norm) or 16-element
/// (add, SwiGLU) boundaries, so every element is computed by the same vector code as in one serial call: the same bits.
/// Below <see cref="MinElements"/> the caller runs them alone (a dispatch costs more than it saves).
/// </summary>
public sealed unsafe class RowOps : ParallelJob
{
    /// <summary>Elements from which an op is spread over the pool.</summary>
    public const long MinElements = 1 << 16;

    /// <summary>Off: every op on the caller (A/B runs).</summary>
    public static bool Parallel { get; set; } = true;

    private enum Op { Norm, Add, SwiGlu }

    private readonly WorkerPool _pool;
    private Op _op;
    private float* _a, _b, _out, _weight;
    private int _rows, _n;
    private long _count;
    private float _eps;

    public RowOps(WorkerPool pool) => _pool = pool;

    /// <summary>output[r] = RMSNorm(x[r]) · weight for rows × n (see <see cref="Ops.RmsNorm"/>).</summary>
    public void RmsNorm(float* x, float* weight, float* output, int rows, int n, float eps)
    {
        if (!Spread((long)rows * n) || rows < _pool.Threads) { Ops.RmsNorm(x, weight, output, rows, n, eps); return; }
        _op = Op.Norm; _a = x; _weight = weight; _out = output; _rows = rows; _n = n; _eps = eps;
        _pool.Run(this, _pool.Threads);
    }

    /// <summary>x ← x + y over n elements.</summary>
    public void AddInPlace(float* x, float* y, long n)
    {
        if (!Spread(n)) { Ops.AddInPlace(x, y, n); return; }
        _op = Op.Add; _a = x; _b = y; _count = n;
        _pool.Run(this, _pool.Threads);
    }

    /// <summary>gate ← silu(gate) · up over n elements.</summary>
    public void SwiGlu(float* gate, float* up, long n)
    {
        if (!Spread(n)) { Ops.SwiGlu(gate, up, n); return; }
        _op = Op.SwiGlu; _a = gate; _b = up; _count = n;
        _pool.Run(this, _pool.Threads);
    }

    private bool Spread(long elements) => Parallel && _pool.Threads > 1 && elements >= MinElements;

    public override void Execute(int chunk, int worker)
    {
        int parts = _pool.Threads;
        if (_op == Op.Norm)
        {
            int r0 = (int)((long)_rows * chunk / parts), r1 = (int)((long)_rows * (chunk + 1) / parts);
            Ops.RmsNorm(_a + (long)r0 * _n, _weight, _out + (long)r0 * _n, r1 - r0, _n, _eps);
            return;
        }
        // Cuts on multiples of 16 elements: each element falls in the same vector (or scalar tail) as in one serial call.
        long e0 = chunk == 0 ? 0 : _count * chunk / parts & ~15L, e1 = chunk == parts - 1 ? _count : _count * (chunk + 1) / parts & ~15L;
        if (e1 <= e0) return;
        if (_op == Op.Add) Ops.AddInPlace(_a + e0, _b + e0, e1 - e0);
        else Ops.SwiGlu(_a + e0, _b + e0, e1 - e0);
    }
}
