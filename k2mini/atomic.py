"""Write a file so that a reader sees the old content or the new, never half of one.

`with atomic_write(path, "w") as f:` writes to a temporary file beside `path` (same folder, so the
final rename cannot cross file systems), flushes and fsyncs it, then renames it over `path`. If the
block raises, the temporary file is removed and `path` is untouched.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def default_mode(directory: bool = False) -> int:
    """The permissions open() or mkdir() would give a new file or folder under the current umask
    (mkstemp and mkdtemp make theirs private, which a result or checkpoint should not be)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), default_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
