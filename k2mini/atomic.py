"""Write files and folders so that a reader sees the old content or the new, never half of one.

`with atomic_write(path, "w") as f:` writes to a temporary file beside `path` (same folder, so the
final rename cannot cross file systems), flushes and fsyncs it, then renames it over `path`. If the
block raises, the temporary file is removed and `path` is untouched. `temp_dir(parent, prefix)` makes
a folder to fill and then rename into place.

Both are created with the permissions open() and mkdir() give under the process's umask, not the
private 0600/0700 of tempfile.mkstemp/mkdtemp: what they become is a result or a checkpoint.

A full disk, an exhausted quota, a read-only file system or a size limit (ENOSPC, EDQUOT, EROFS,
EFBIG, EIO) while writing is a `WriteError`: an OSError that keeps the errno and names the file being
written and the cause. Without it, a full disk inside `torch.save` surfaces as torch's own
"[enforce fail at inline_container.cc] unexpected pos" RuntimeError, naming neither.
"""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "temp_dir", "WriteError", "DISK_ERRNOS", "disk_errors", "write_error"]

# errnos that say the storage, not the caller, refused the write
DISK_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EIO") if hasattr(errno, n))


class WriteError(OSError):
    """A file could not be written because of its storage: `filename` is the file, `errno` the cause."""

    def __str__(self):
        code = errno.errorcode.get(self.errno, str(self.errno))
        return f"cannot write {self.filename}: {self.strerror} ({code}); nothing there was replaced"


def write_error(path, cause: OSError) -> WriteError:
    """A WriteError naming `path` (what the caller was writing) with `cause`'s errno and text."""
    return WriteError(cause.errno, cause.strerror or os.strerror(cause.errno or 0), os.fspath(path))


@contextmanager
def disk_errors(path):
    """Re-raise a storage OSError (DISK_ERRNOS) inside the block as a WriteError naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise write_error(path, e) from e
        raise


def _fresh_name(parent: Path, prefix: str) -> Path:
    return parent / f"{prefix}{secrets.token_hex(6)}.tmp"


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, empty folder `parent/<prefix><random>.tmp` (parent created if missing)."""
    parent = Path(parent)
    with disk_errors(parent):
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            path = _fresh_name(parent, prefix)
            try:
                path.mkdir(mode=0o777)  # the umask applies, as for any mkdir
                return path
            except FileExistsError:
                continue


class _Recorder:
    """The file, with the first OSError a write raised kept: torch.save's C++ writer swallows it and
    fails later with a message of its own."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = _fresh_name(path.parent, f".{path.name}.")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
                break
            except FileExistsError:
                continue
    recorder = None
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            recorder = _Recorder(f)
            yield recorder
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = e if isinstance(e, OSError) else (recorder.error if recorder is not None else None)
        if isinstance(cause, OSError) and not isinstance(cause, WriteError) and cause.errno in DISK_ERRNOS:
            raise write_error(path, cause) from e
        raise
