"""Write files and folders so that a reader sees the old content or the new, never half of one.

`with atomic_write(path, "w") as f:` writes to a temporary file beside `path` (same folder, so the
final rename cannot cross file systems), flushes and fsyncs it, then renames it over `path`. If the
block raises, the temporary file is removed and `path` is untouched. `temp_dir(parent, prefix)` makes
a folder to fill and then rename into place.

Both are created with the permissions open() and mkdir() give under the process's umask, not the
private 0600/0700 of tempfile.mkstemp/mkdtemp: what they become is a result or a checkpoint.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


def _fresh_name(parent: Path, prefix: str) -> Path:
    return parent / f"{prefix}{secrets.token_hex(6)}.tmp"


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, empty folder `parent/<prefix><random>.tmp` (parent created if missing)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = _fresh_name(parent, prefix)
        try:
            path.mkdir(mode=0o777)  # the umask applies, as for any mkdir
            return path
        except FileExistsError:
            continue


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _fresh_name(path.parent, f".{path.name}.")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
