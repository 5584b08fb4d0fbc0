"""Who owns a folder right now: an advisory lock file, held for as long as a process works on it.

`hold(lock_path, what)` creates `lock_path` (under the umask), takes an exclusive `fcntl.flock` on it
and writes the holder into it ("pid 1234 on host h since 2026-..."). The kernel drops a flock when its
process ends, however it ends (exit, exception, kill -9), so a lock file left by a process that is gone
is stale by construction: the next `hold` simply takes it over. On release the file is removed while
still locked; a waiter that then gets the lock on the removed file sees that the path no longer names
it and tries again, so two processes never both believe they hold it.

`blocking=False` (a training run's checkpoint_dir) refuses at once with `LockedError` naming the
holder; `blocking=True` (save_pretrained) waits for the holder to finish. Where fcntl does not exist
(Windows), nothing is locked.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

from .atomic import disk_errors

__all__ = ["LockedError", "hold", "holder_of", "process_alive"]


class LockedError(RuntimeError):
    """Another process holds the lock: the message names it (pid, host, since when) and the lock file."""


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def holder_of(lock_path) -> str:
    """What the lock file says about its holder, or 'an unknown process'."""
    try:
        text = Path(lock_path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "an unknown process"


def _describe() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


@contextmanager
def hold(lock_path, what: str, blocking: bool = False, say_waiting: bool = True):
    """Hold an exclusive lock on `lock_path` for the block. `what` names the thing locked in the error
    ("checkpoint_dir runs/a"). Raises LockedError (blocking=False) if another process holds it; with
    blocking=True waits for it, saying so in a RuntimeWarning unless say_waiting is False."""
    lock_path = Path(lock_path)
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = _acquire(lock_path, what, blocking, say_waiting)
    try:
        yield
    finally:
        try:
            if _same_file(fd, lock_path):
                os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)  # drops the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(lock_path: Path, what: str, blocking: bool, say_waiting: bool) -> int:
    with disk_errors(lock_path):
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with disk_errors(lock_path):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = f"{what} is in use by {holder_of(lock_path)} (lock file {lock_path})"
                if not blocking:
                    raise LockedError(f"{busy}; wait for it to finish, or use another directory") from None
                if say_waiting:
                    warnings.warn(f"{busy}; waiting for it to finish", RuntimeWarning, stacklevel=5)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, lock_path):  # its holder removed it as we waited: lock the new one
                os.close(fd)
                continue
            with disk_errors(lock_path):
                os.ftruncate(fd, 0)
                os.write(fd, (_describe() + "\n").encode())
            return fd
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
