import pytest

from orchestration.errors import DataError
from orchestration.data.tokenizers import ByteTokenizer, load_tokenizer, token_dtype, train_bpe

TRICKY = ["hello  world\n", "  leading and trailing  ", "tabs\t\tand\r\nCRLF", "ünïcödé 日本語 🙂 emoji",
          "", "x", "a\n\n\nb", "<|endoftext|> looks special but is text"]


@pytest.fixture(scope="module")
def bpe():
    corpus = ["The quick brown fox jumps over the lazy dog. " * 5, "def f(x):\n    return x + 1\n"] * 40
    return train_bpe(corpus, vocab_size=400)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_exact(bpe, text):
    for tok in (bpe, ByteTokenizer()):
        assert tok.decode(tok.encode(text)) == text


def test_bpe_compresses_and_has_eos(bpe):
    text = "The quick brown fox jumps over the lazy dog."
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    assert 0 <= bpe.eos_id < bpe.vocab_size <= 400


def test_save_and_reuse_by_path(bpe, tmp_path):
    bpe.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("quick fox") == bpe.encode("quick fox")
    ByteTokenizer().save(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b" / "tokenizer.json").kind == "bytes"


def test_errors_and_dtype(tmp_path):
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="at least 258"):
        train_bpe(["abc"], vocab_size=100)
    assert token_dtype(4096).itemsize == 2 and token_dtype(70000).itemsize == 4
