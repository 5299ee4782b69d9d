using System.Text.Json;
using MiniLlm.Loader;

namespace MiniLlm.Tests;

/// <summary>Encodings and decodings against the SentencePiece library's own, for both tokenizers.</summary>
public class TokenizerTests
{
    public static TheoryData<string> Dirs => new() { "models/tiny-kjv", "tokenizers/llama2" };

    private static (TextTokenizer Tok, List<(string Text, int[] Ids, string Decoded)> Cases) Load(string rel)
    {
        var dir = Path.Combine(TestPaths.Shared, rel);
        var tok = TextTokenizer.Load(Path.Combine(dir, "tokenizer.model"));
        using var doc = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(dir, "tokenizer_tests.json")));
        var cases = doc.RootElement.GetProperty("cases").EnumerateArray()
            .Select(c => (c.GetProperty("text").GetString()!, c.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(), c.GetProperty("decoded").GetString()!))
            .ToList();
        Assert.True(cases.Count >= 10);
        return (tok, cases);
    }

    [Theory]
    [MemberData(nameof(Dirs))]
    public void EncodingsMatchSentencePiece(string rel)
    {
        var (tok, cases) = Load(rel);
        foreach (var (text, ids, _) in cases)
        {
            Assert.Equal(ids, tok.Encode(text, addBos: false));
            var withBos = tok.Encode(text);
            Assert.Equal(tok.BosId, withBos[0]);
            Assert.Equal(ids, withBos[1..]);
        }
    }

    [Theory]
    [MemberData(nameof(Dirs))]
    public void DecodingsMatchSentencePiece(string rel)
    {
        var (tok, cases) = Load(rel);
        foreach (var (_, ids, decoded) in cases) Assert.Equal(decoded, tok.Decode(ids));
    }

    [Theory]
    [MemberData(nameof(Dirs))]
    public void StreamingDecodeEqualsWholeDecodeAndNeverSplitsACharacter(string rel)
    {
        var (tok, cases) = Load(rel);
        foreach (var (text, ids, decoded) in cases)
        {
            var dec = tok.NewStreamingDecoder();
            var pieces = ids.Select(dec.Next).Append(dec.Flush()).ToList();
            Assert.Equal(decoded, string.Concat(pieces));
            foreach (var p in pieces)
            {
                Assert.DoesNotContain('\uFFFD', p);
                if (p.Length > 0) Assert.False(char.IsHighSurrogate(p[^1]), $"'{text}': piece ends inside a surrogate pair");
            }
        }
    }

    [Fact]
    public void MultiByteCharactersArriveWholeAfterTheirLastByte()
    {
        var tok = TextTokenizer.Load(Path.Combine(TestPaths.Model("tiny-kjv"), "tokenizer.model"));
        var ids = tok.Encode("a 🙂 é", addBos: false);
        var dec = tok.NewStreamingDecoder();
        var pieces = ids.Select(dec.Next).ToList();
        Assert.Contains("🙂", pieces);  // four byte tokens → one emission
        Assert.Equal("a 🙂 é", string.Concat(pieces) + dec.Flush());
    }

    [Fact]
    public void ContinuationKeepsTheLeadingSpace()
    {
        var tok = TextTokenizer.Load(Path.Combine(TestPaths.Model("tiny-kjv"), "tokenizer.model"));
        var ids = tok.Encode(" the", addBos: false);
        Assert.Equal(" the", string.Concat(ids.Select(tok.NewStreamingDecoder(continuation: true).Next)));
        Assert.Equal("the", string.Concat(ids.Select(tok.NewStreamingDecoder().Next)));
    }

    [Fact]
    public void WhitespaceOnlyInputEncodesToNothingForThisNormalizer()
    {
        var tok = TextTokenizer.Load(Path.Combine(TestPaths.Model("tiny-kjv"), "tokenizer.model"));
        Assert.True(tok.RemoveExtraWhitespaces);
        Assert.Empty(tok.Encode("   ", addBos: false));
        var llama2 = TextTokenizer.Load(Path.Combine(TestPaths.Llama2Tokenizer, "tokenizer.model"));
        Assert.False(llama2.RemoveExtraWhitespaces);
    }
}
