namespace MiniLlm.Kernels;

/// <summary>
/// Several products of one X (q/k/v, gate/up) cut into one list of chunks of <see cref="RowsPerChunk"/> weight rows,
/// so they run in a single dispatch: chunk index → its product and first row. Arrays grow once, never per call.
/// </summary>
internal sealed class ProductChunks
{
    private MatMul.Product[] _products = new MatMul.Product[4];
    private int[] _first = new int[5];       // first chunk of each product, then the total

    /// <summary>Products currently set (0 when none: the owner uses that to tell grouped calls from single ones).</summary>
    public int Count { get; private set; }
    public int RowsPerChunk { get; private set; }

    /// <summary>Takes the products and returns how many chunks they make.</summary>
    public int Set(ReadOnlySpan<MatMul.Product> products, int rowsPerChunk)
    {
        if (_products.Length < products.Length)
        {
            _products = new MatMul.Product[products.Length];
            _first = new int[products.Length + 1];
        }
        RowsPerChunk = rowsPerChunk;
        int chunks = 0;
        for (int i = 0; i < products.Length; i++)
        {
            _products[i] = products[i];
            _first[i] = chunks;
            chunks += (products[i].W.Rows + rowsPerChunk - 1) / rowsPerChunk;
        }
        _first[products.Length] = chunks;
        Count = products.Length;
        return chunks;
    }

    /// <summary>The product chunk <paramref name="chunk"/> belongs to, and its index within that product.</summary>
    public ref readonly MatMul.Product Find(int chunk, out int local)
    {
        int pi = 0;
        while (_first[pi + 1] <= chunk) pi++;   // a handful of products: a linear walk is cheapest
        local = chunk - _first[pi];
        return ref _products[pi];
    }

    private int[] _guidedProduct = new int[64];   // guided plans: each chunk's product …
    private int[] _guidedRow = new int[64];       // … and first row (its last is the next chunk's first, or the end)
    private int _guidedCount;

    /// <summary>
    /// Guided cut (as OpenMP's schedule(guided)): each chunk takes about 1/(2·threads) of the rows still left, at
    /// least <paramref name="minRows"/>, a multiple of 4, never spanning two products. Large chunks first keep stream
    /// starts few; the small last ones let the thread that finishes first take the tail instead of idling while the
    /// other reads a whole fixed-size chunk alone (a GEMV from DRAM read 5–10 % faster so, kernel harness).
    /// </summary>
    public int SetGuided(ReadOnlySpan<MatMul.Product> products, int minRows, int threads)
    {
        Begin(products);
        long left = 0;
        foreach (var p in products) left += p.W.Rows;
        for (int pi = 0; pi < products.Length; pi++)
            for (int r = 0, rows = products[pi].W.Rows; r < rows;)
            {
                int take = (int)Math.Min(rows - r, Math.Max(minRows, left / (2 * threads) + 3 & ~3L));
                Add(pi, r);
                r += take;
                left -= take;
            }
        return _guidedCount;
    }

    /// <summary>
    /// Pinned cut: each product in <paramref name="threads"/> parts of nearly equal rows (multiples of
    /// <paramref name="align"/>), product-major, so chunk c is part c mod threads of its product and a pinned dispatch
    /// (<see cref="WorkerPool.RunPinned"/>) gives every thread the same rows on every call. Read back by
    /// <see cref="Guided"/>.
    /// </summary>
    public int SetPinned(ReadOnlySpan<MatMul.Product> products, int threads, int align)
    {
        Begin(products);
        for (int pi = 0; pi < products.Length; pi++)
        {
            int rows = products[pi].W.Rows;
            int units = (rows + align - 1) / align;
            for (int t = 0; t < threads; t++) Add(pi, Math.Min(rows, (int)((long)units * t / threads) * align));
        }
        return _guidedCount;
    }

    /// <summary>
    /// Two-thread cut: each product's rows [0, split) for worker 0 and [split, rows) for worker 1, the split at
    /// <paramref name="share0"/> of the rows rounded to a multiple of <paramref name="align"/>; read back by
    /// <see cref="Guided"/>, dispatched pinned. Returns the chunk count (two a product); <paramref name="firstShare"/>:
    /// the fraction of all rows worker 0 got.
    /// </summary>
    public int SetSplit(ReadOnlySpan<MatMul.Product> products, double share0, int align, out double firstShare)
    {
        Begin(products);
        long first = 0, all = 0;
        for (int pi = 0; pi < products.Length; pi++)
        {
            int rows = products[pi].W.Rows;
            int split = Math.Clamp((int)Math.Round(rows * share0 / align) * align, 0, rows);
            first += split;
            all += rows;
            Add(pi, 0);
            Add(pi, split);
        }
        firstShare = all > 0 ? (double)first / all : 0;
        return _guidedCount;
    }

    /// <summary>Takes the products of a plan of chunks (each a product and a first row), starting it empty.</summary>
    private void Begin(ReadOnlySpan<MatMul.Product> products)
    {
        if (_products.Length < products.Length) _products = new MatMul.Product[products.Length];
        products.CopyTo(_products);
        Count = products.Length;
        _guidedCount = 0;
    }

    /// <summary>Appends a chunk: product <paramref name="product"/> from <paramref name="row"/> (to the next chunk's
    /// first row of the same product, or its end).</summary>
    private void Add(int product, int row)
    {
        if (_guidedCount == _guidedRow.Length)
        {
            Array.Resize(ref _guidedRow, 2 * _guidedCount);
            Array.Resize(ref _guidedProduct, 2 * _guidedCount);
        }
        _guidedProduct[_guidedCount] = product;
        _guidedRow[_guidedCount++] = row;
    }

    /// <summary>Chunk <paramref name="chunk"/> of a guided plan: its product and rows [r0, r1).</summary>
    public ref readonly MatMul.Product Guided(int chunk, out int r0, out int r1)
    {
        int pi = _guidedProduct[chunk];
        r0 = _guidedRow[chunk];
        r1 = chunk + 1 < _guidedCount && _guidedProduct[chunk + 1] == pi ? _guidedRow[chunk + 1] : _products[pi].W.Rows;
        return ref _products[pi];
    }

    public void Clear() { Count = 0; _guidedCount = 0; }
}
