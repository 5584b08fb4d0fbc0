"""What a run does when training diverges: stop (or raise), naming the step and the last good checkpoint.

Divergence is a non-finite loss, gradient norm or max logit in a step (the step then changed nothing),
or non-finite weights or optimizer state when a checkpoint is due (nothing is saved). No non-finite
state is ever written; the last good checkpoint is the newest one saved before the weights that
diverged (checkpoint_dir.newest_good).
"""

from __future__ import annotations

import math
import os
import warnings

from .checkpoint_dir import newest_good, set_aside_diverged
from .resume_state import PREV, check_finite_state, save_checkpoint

__all__ = ["NonFiniteLossError", "ON_NONFINITE", "stop_on_nonfinite", "problem_reason", "save_or_stop"]

ON_NONFINITE = ("stop", "raise")


class NonFiniteLossError(FloatingPointError):
    """Raised (with on_nonfinite="raise") when training diverges: the loss, the gradient norm, a max
    attention logit or (at a checkpoint) a weight stops being finite. The message names the step, what
    was not finite and the last good checkpoint."""


def stop_on_nonfinite(problem: str, step: int, ckpt_path: str | None, on_nonfinite: str, reason: str, rank: int,
                      good_before: int | None = None) -> str:
    """Raise NonFiniteLossError, or warn; returns the stop reason. The last good checkpoint is the newest
    saved after a step < good_before - 1 (default `step`): later weights are the ones that diverged. If
    that is prev.pt, rank 0 sets last.pt aside and makes prev.pt the last.pt that resume=True continues."""
    good = newest_good(os.path.dirname(ckpt_path), step if good_before is None else good_before) if ckpt_path else None
    note = ""
    if good is not None and good.name == PREV and rank == 0:
        good = set_aside_diverged(good.parent)
        note = f" (it was {PREV}; the newer checkpoint, whose weights diverged, is now {good.parent}/diverged-step*.pt)"
    msg = (f"{problem} at step {step}; stopping. "
           + (f"The last good checkpoint is {good}{note}." if good else "No good checkpoint was written."))
    if on_nonfinite == "raise":
        raise NonFiniteLossError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)  # at train()'s caller (called from train)
    return reason


def problem_reason(loss: float, step: int) -> str:
    """The stop reason recorded in history.attrs for a step that was not finite."""
    if not math.isfinite(loss):
        return f"non-finite loss at step {step}"
    return f"non-finite gradient or max logit at step {step}"


def save_or_stop(ckpt_path, model, optimizer, step, rows, cfg, first: bool, on_nonfinite: str, rank: int) -> str | None:
    """Save a checkpoint after `step` (rank 0; the other ranks only check, so that all stop together);
    if the weights or optimizer state are not finite, save nothing and stop as for a divergence
    (returns the stop reason)."""
    try:
        if rank == 0:
            save_checkpoint(ckpt_path, model, optimizer, step, rows, cfg, keep_previous=not first)
        else:
            check_finite_state(model, optimizer, step)
    except FloatingPointError as e:
        return stop_on_nonfinite(f"{e}", step, ckpt_path, on_nonfinite, f"non-finite weights after step {step}", rank,
                                 good_before=step + 1)
    return None
