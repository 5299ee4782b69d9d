using System.Text;
using Google.Protobuf;
using Microsoft.ML.Tokenizers;

namespace MiniLlm.Loader;

/// <summary>
/// The model's SentencePiece tokenizer (Microsoft.ML.Tokenizers <see cref="LlamaTokenizer"/>), plus the one
/// normalizer rule the library does not apply: with <c>remove_extra_whitespaces</c>, text made only of spaces
/// encodes to nothing (the library would emit a lone "▁").
/// </summary>
public sealed class TextTokenizer
{
    private readonly SentencePieceTokenizer _tok;
    private readonly string[] _pieces;      // id → piece text, "▁" for spaces
    private readonly int[] _byteValue;      // id → byte value for <0xNN> pieces, else -1

    public int VocabSize => _pieces.Length;
    public int BosId => _tok.BeginningOfSentenceId;
    public int EosId => _tok.EndOfSentenceId;
    public bool AddBos { get; }
    public bool AddDummyPrefix => _tok.AddDummyPrefix;
    public bool RemoveExtraWhitespaces { get; }
    public string Path { get; }

    private TextTokenizer(string path, SentencePieceTokenizer tok, bool addBos, bool removeExtraWhitespaces)
    {
        Path = path; _tok = tok; AddBos = addBos; RemoveExtraWhitespaces = removeExtraWhitespaces;
        int n = 0;
        foreach (var kv in tok.Vocabulary) n = Math.Max(n, kv.Value + 1);
        _pieces = new string[n];
        _byteValue = new int[n];
        Array.Fill(_byteValue, -1);
        Array.Fill(_pieces, "");
        foreach (var (piece, id) in tok.Vocabulary)
        {
            _pieces[id] = piece;
            if (piece.Length == 6 && piece.StartsWith("<0x", StringComparison.Ordinal) && piece[5] == '>' &&
                byte.TryParse(piece.AsSpan(3, 2), System.Globalization.NumberStyles.HexNumber, null, out byte b))
                _byteValue[id] = b;
        }
    }

    /// <summary>Loads <c>tokenizer.model</c>. <paramref name="addBos"/>: whether prompts start with BOS (Llama models: yes).</summary>
    public static TextTokenizer Load(string path, bool addBos = true)
    {
        if (!File.Exists(path)) throw new ModelFormatException($"{path}: tokenizer.model not found");
        byte[] bytes = File.ReadAllBytes(path);
        SentencePieceTokenizer tok;
        bool removeExtra;
        try
        {
            using var s = new MemoryStream(bytes, writable: false);
            tok = LlamaTokenizer.Create(s, addBeginOfSentence: false, addEndOfSentence: false);
            removeExtra = ReadRemoveExtraWhitespaces(bytes);
        }
        catch (Exception e) when (e is InvalidProtocolBufferException or ArgumentException or InvalidOperationException or FormatException)
        {
            throw new ModelFormatException($"{path}: not a SentencePiece model ({e.Message})", e);
        }
        return new TextTokenizer(path, tok, addBos, removeExtra);
    }

    /// <summary>Encodes text; BOS first when the model expects it and <paramref name="addBos"/> allows.</summary>
    public int[] Encode(string text, bool addBos = true)
    {
        IReadOnlyList<int> body = RemoveExtraWhitespaces && IsOnlySpaces(text)
            ? []
            : _tok.EncodeToIds(text, addBeginningOfSentence: false, addEndOfSentence: false);
        bool bos = addBos && AddBos;
        var ids = new int[body.Count + (bos ? 1 : 0)];
        if (bos) ids[0] = BosId;
        for (int i = 0; i < body.Count; i++) ids[i + (bos ? 1 : 0)] = body[i];
        return ids;
    }

    /// <summary>Decodes a whole sequence the way SentencePiece does (BOS/EOS dropped, dummy-prefix space removed).</summary>
    public string Decode(IEnumerable<int> ids) => _tok.Decode(ids, considerSpecialTokens: false);

    public string Piece(int id) => (uint)id < (uint)_pieces.Length ? _pieces[id] : throw new ArgumentOutOfRangeException(nameof(id), $"token id {id} is outside the vocabulary ({_pieces.Length})");

    /// <summary>
    /// A decoder that turns ids into text one at a time, for streaming. <paramref name="continuation"/>: the ids
    /// continue text already shown (generated output after a prompt), so a leading space is real and kept;
    /// otherwise they start a text and the dummy-prefix space is dropped, as <see cref="Decode"/> does.
    /// </summary>
    public StreamingDecoder NewStreamingDecoder(bool continuation = false) => new(this, continuation);

    internal int ByteValue(int id) => _byteValue[id];
    internal string RawPiece(int id) => _pieces[id];

    private static bool IsOnlySpaces(string s)
    {
        foreach (char c in s) if (c != ' ') return false;
        return true;
    }

    /// <summary>ModelProto.normalizer_spec (field 3).remove_extra_whitespaces (field 4), default true.</summary>
    private static bool ReadRemoveExtraWhitespaces(byte[] model)
    {
        var input = new CodedInputStream(model);
        uint tag;
        while ((tag = input.ReadTag()) != 0)
        {
            if (WireFormat.GetTagFieldNumber(tag) == 3 && WireFormat.GetTagWireType(tag) == WireFormat.WireType.LengthDelimited)
            {
                var spec = new CodedInputStream(input.ReadBytes().ToByteArray());
                bool remove = true;
                uint t;
                while ((t = spec.ReadTag()) != 0)
                {
                    if (WireFormat.GetTagFieldNumber(t) == 4 && WireFormat.GetTagWireType(t) == WireFormat.WireType.Varint) remove = spec.ReadBool();
                    else spec.SkipLastField();
                }
                return remove;
            }
            input.SkipLastField();
        }
        return true;
    }
}

/// <summary>
/// Incremental detokenizer: each call returns the text that became final with that token. Spaces ("▁")
/// come out as they arrive, the dummy-prefix space of the first piece is dropped, and a UTF-8 character
/// split across byte-fallback tokens is emitted whole once its last byte arrives.
/// </summary>
public sealed class StreamingDecoder
{
    private readonly TextTokenizer _tok;
    private readonly Decoder _utf8 = new UTF8Encoding(false, false).GetDecoder();
    private readonly byte[] _one = new byte[1];
    private readonly char[] _chars = new char[8];
    private bool _atStart;

    internal StreamingDecoder(TextTokenizer tok, bool continuation)
    {
        _tok = tok;
        _atStart = !continuation;
    }

    public string Next(int id)
    {
        if (id == _tok.BosId || id == _tok.EosId) return "";
        int b = _tok.ByteValue(id);
        if (b >= 0)
        {
            _one[0] = (byte)b;
            int n = _utf8.GetChars(_one, 0, 1, _chars, 0, flush: false);
            if (n == 0) return "";
            return Emit(new string(_chars, 0, n));
        }
        // A normal piece ends any pending byte sequence: flush it as U+FFFD like SentencePiece would.
        string pending = Flush();
        return pending + Emit(_tok.RawPiece(id).Replace('▁', ' '));
    }

    /// <summary>Whatever incomplete UTF-8 is still buffered, as replacement characters.</summary>
    public string Flush()
    {
        int n = _utf8.GetChars([], 0, 0, _chars, 0, flush: true);
        return n == 0 ? "" : Emit(new string(_chars, 0, n));
    }

    private string Emit(string s)
    {
        if (_atStart && s.Length > 0)
        {
            _atStart = false;
            if (_tok.AddDummyPrefix && s[0] == ' ') s = s[1..];
        }
        return s;
    }
}
