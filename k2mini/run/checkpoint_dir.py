"""The directory a training run keeps its checkpoints in: who owns it, and which checkpoint is still good.

A run owns `checkpoint_dir` while it trains (`own_checkpoint_dir`: a lock file, `.run.lock`, naming the
holder; see k2mini/locks.py): a second run into the same directory is refused by name instead of both
writing over each other's checkpoints. On taking the directory, temporary files a killed run left there
are removed. Under torchrun rank 0 holds it and tells the other ranks whether it could (`owning`), so
that a refusal stops every rank instead of leaving them waiting in a collective. A directory that holds
another run's checkpoints is refused unless the run resumes it or overwrites it (`checkpoint_path`).

After a divergence, `newest_good` finds the newest checkpoint saved before the weights that diverged; if
that is prev.pt, `set_aside_diverged` makes it last.pt again, so that a resume continues from it.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .. import locks
from .resume_state import LAST, PREV, CheckpointDamagedError, load_checkpoint

__all__ = ["LOCK", "own_checkpoint_dir", "owning", "checkpoint_path", "existing_checkpoints", "newest_good",
           "set_aside_diverged"]

LOCK = ".run.lock"


# ----------------------------------------------------------------------------------------------
# Owning the directory


@contextmanager
def own_checkpoint_dir(checkpoint_dir):
    """Hold `checkpoint_dir` for one run (LockedError naming the holder if another live process has
    it), first removing the temporary files a killed run left in it."""
    d = Path(checkpoint_dir)
    with locks.hold(d / LOCK, f"checkpoint_dir {os.fspath(checkpoint_dir)!r}", blocking=False):
        for name in (LAST, PREV):  # atomic_write's and resume_state's temporary names
            for leftover in d.glob(f".{name}.*.tmp"):
                leftover.unlink(missing_ok=True)
        yield d


@contextmanager
def owning(checkpoint_dir, rank: int, world: int):
    """Rank 0 holds checkpoint_dir for the run (`own_checkpoint_dir`); if another run has it (or its lock
    file cannot be written), every rank raises, so that none waits for the others in a collective.
    Nothing is held for checkpoint_dir None."""
    if checkpoint_dir is None:
        yield
        return
    with ExitStack() as stack:
        refusal = None
        if rank == 0:
            try:
                stack.enter_context(own_checkpoint_dir(checkpoint_dir))
            except Exception as e:  # refused, or the lock file could not be written
                refusal = e
        if world > 1:
            said = [None if refusal is None else (isinstance(refusal, locks.LockedError), str(refusal))]
            dist.broadcast_object_list(said, src=0)
            if said[0] is not None and refusal is None:
                refusal = (locks.LockedError if said[0][0] else RuntimeError)(f"rank 0: {said[0][1]}")
        if refusal is not None:
            raise refusal
        yield


def checkpoint_path(checkpoint_dir, resume: bool, overwrite: bool) -> str | None:
    """Where the run's last.pt goes (None without a checkpoint_dir), after refusing a resume without a
    directory, resume and overwrite together, and a directory holding another run's checkpoints."""
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs a checkpoint_dir")
        return None
    if resume and overwrite:
        raise ValueError("pass resume=True (continue the run in checkpoint_dir) or overwrite=True (replace it), not both")
    found = existing_checkpoints(checkpoint_dir)
    if found and not resume and not overwrite:
        raise FileExistsError(
            f"{found[0]}: checkpoint_dir holds another run's checkpoint; pass resume=True to continue it, "
            "overwrite=True to replace it, or another checkpoint_dir"
        )
    os.makedirs(checkpoint_dir, exist_ok=True)
    return os.path.join(os.fspath(checkpoint_dir), LAST)


# ----------------------------------------------------------------------------------------------
# Which checkpoint is good


def existing_checkpoints(checkpoint_dir) -> list[Path]:
    d = Path(checkpoint_dir)
    return [d / n for n in (LAST, PREV) if (d / n).exists()]


def newest_good(checkpoint_dir, before_step: int) -> Path | None:
    """The newest checkpoint whose weights went on to give a finite loss: saved after a step < before_step
    - 1 (the weights saved after step before_step - 1 are the ones that just diverged). Unreadable or
    damaged files are skipped."""
    for path in existing_checkpoints(checkpoint_dir):
        try:
            step = load_checkpoint(path)["step"]
        except (CheckpointDamagedError, OSError):
            continue
        if step < before_step - 1:
            return path
    return None


def set_aside_diverged(checkpoint_dir) -> Path:
    """After a divergence whose last good checkpoint is prev.pt: last.pt (the weights that diverged)
    becomes diverged-step<N>.pt and prev.pt becomes last.pt, so that resume=True continues from the good
    state and no later save rotates it away. Returns the good checkpoint's new path."""
    d = Path(checkpoint_dir)
    step = torch.load(d / LAST, map_location="cpu", weights_only=True)["step"]
    os.replace(d / LAST, d / f"diverged-step{step}.pt")
    os.replace(d / PREV, d / LAST)
    return d / LAST
