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

    public void Clear() => Count = 0;
}
