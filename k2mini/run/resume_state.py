"""Resume state: what a training checkpoint holds, written so that it never loses a good state.

A checkpoint is a plain `torch.save` dict (model, optimizer, step, history rows, settings) plus
`checksum`, a sha256 over the contents of every tensor and value in it: `torch.load` does not check its
archive's CRCs, so damage in place would otherwise resume with wrong numbers. `<checkpoint_dir>/last.pt`
is the newest and `prev.pt` the one before it: a save first links (or copies) `last.pt` to `prev.pt`,
then writes the new `last.pt` atomically, so a kill at any moment leaves at least one complete
checkpoint. Only finite weights and optimizer state are saved (`nonfinite_tensor` says which is not).
`resume_from` loads one back; a resume with other settings (model config, optimizer kind or
hyperparameters, training settings that change the math) is refused, naming each difference.

The directory the two files live in (who owns it, which checkpoint is still good after a divergence) is
checkpoint_dir.py.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import atomic_write, disk_errors

__all__ = ["CheckpointDamagedError", "LAST", "PREV", "save_checkpoint", "load_checkpoint", "check_settings",
           "nonfinite_tensor", "check_finite_state", "run_settings", "resume_from"]

LAST, PREV = "last.pt", "prev.pt"
FORMAT = "k2mini.train/2"
# TrainConfig fields that change what is logged or when, not the numbers a resumed run computes
_SCHEDULING_FIELDS = {"steps", "eval_every", "eval_batches", "log_every", "checkpoint_every"}
# optimizer group keys that are not hyperparameters (lr is the scheduled value; peak_lr is compared)
_GROUP_SKIP = {"params", "param_names", "lr", "initial_lr"}


class CheckpointDamagedError(RuntimeError):
    """A training checkpoint cannot be read back, or its contents do not match their checksum."""


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds


def _digest(obj, h) -> None:
    """Feed obj's contents, in a fixed order, into hash h (tensors by dtype, shape and bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer, no copy
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{obj!r}".encode())


def checksum(state: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return h.hexdigest()


def run_settings(model, optimizer, cfg) -> dict:
    """What must match for a resume to continue the same run."""
    groups = [{k: v for k, v in g.items() if k not in _GROUP_SKIP} for g in optimizer.param_groups]
    model_config = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else None
    return {"model_config": model_config, "optimizer": type(optimizer).__name__, "optimizer_groups": groups,
            "train_config": asdict(cfg)}


def nonfinite_tensor(model, optimizer) -> str | None:
    """The name of the first parameter, buffer or optimizer-state tensor holding inf or nan, or None."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, t in state.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"optimizer state {key!r} of {names.get(id(p), 'a parameter')}"
    return None


def check_finite_state(model, optimizer, step: int) -> None:
    """FloatingPointError naming the first non-finite weight, buffer or optimizer state."""
    bad = nonfinite_tensor(model, optimizer)
    if bad is not None:
        raise FloatingPointError(f"not saving a checkpoint after step {step}: {bad} holds inf or nan")


# ----------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(path, model, optimizer, step: int, rows: list, cfg, keep_previous: bool = True) -> None:
    """Write `path` (a `last.pt`) atomically; its old version becomes `prev.pt` beside it first
    (removed instead when keep_previous is False: a new run's first save over `overwrite=True`).
    Raises FloatingPointError, writing nothing, if a weight or optimizer state is not finite."""
    check_finite_state(model, optimizer, step)
    path = Path(path)
    state = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rows": rows,
        "train_config": asdict(cfg),
        "settings": run_settings(model, optimizer, cfg),
    }
    state["checksum"] = checksum(state)
    _keep_as_previous(path, keep_previous)
    with atomic_write(path) as f:  # a reader sees the old checkpoint or the new one, never half of one
        torch.save(state, f)


def _keep_as_previous(path: Path, keep: bool) -> None:
    prev = path.with_name(PREV)
    if not keep:
        prev.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    tmp = path.with_name(f".{PREV}.{secrets.token_hex(6)}.tmp")
    try:
        with disk_errors(prev):
            try:
                os.link(path, tmp)  # last.pt is replaced by a rename later, so the link keeps the old bytes
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, prev)
    finally:
        # also after a successful replace: when prev.pt already is last.pt (a save that failed after this
        # step), the rename of one link onto another of the same file does nothing and leaves tmp
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Reading


def load_checkpoint(path) -> dict:
    """The checkpoint's state dict, its checksum verified; CheckpointDamagedError names the file."""
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointDamagedError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "rows"} <= set(state):
        raise CheckpointDamagedError(f"{path}: not a k2mini training checkpoint (model/optimizer/step/rows missing)")
    if "checksum" not in state:
        raise CheckpointDamagedError(f"{path}: has no checksum (written by an older k2mini?); cannot verify it")
    if checksum(state) != state["checksum"]:
        raise CheckpointDamagedError(f"{path}: its contents do not match its checksum: the file is damaged")
    return state


def check_settings(path, saved: dict | None, now: dict) -> None:
    """ValueError naming every setting in which the run being resumed differs from the checkpoint's."""
    if saved is None:
        return
    diffs = []
    if saved.get("model_config") != now["model_config"]:
        a, b = saved.get("model_config") or {}, now["model_config"] or {}
        diffs += [f"model config {k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if saved.get("optimizer") != now["optimizer"]:
        diffs.append(f"optimizer: {saved.get('optimizer')} -> {now['optimizer']}")
    else:
        old_groups, new_groups = saved.get("optimizer_groups", []), now["optimizer_groups"]
        if len(old_groups) != len(new_groups):
            diffs.append(f"optimizer param groups: {len(old_groups)} -> {len(new_groups)}")
        for i, (a, b) in enumerate(zip(old_groups, new_groups)):
            label = b.get("name", i)
            diffs += [f"optimizer group {label} {k}: {a.get(k)!r} -> {b.get(k)!r}"
                      for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
    a, b = saved.get("train_config", {}), now["train_config"]
    free = _SCHEDULING_FIELDS - ({"steps"} if b.get("schedule") == "cosine" else set())  # cosine decays over steps
    diffs += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
              if k not in free and a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(
            f"{path}: resuming with settings other than the checkpoint's: " + "; ".join(diffs)
            + ". Resume with the same settings, or start a new run in another checkpoint_dir (or overwrite=True)."
        )


def resume_from(path, model, optimizer, cfg=None) -> tuple[list[dict], int]:
    """Load model and optimizer state from a checkpoint (checksum verified); return its history rows and
    the next step. With `cfg` (a TrainConfig), a checkpoint of other settings (model config, optimizer
    kind or hyperparameters, training settings) is refused with a ValueError naming them, before anything
    loads."""
    state = load_checkpoint(path)
    if cfg is not None:
        check_settings(path, state.get("settings"), run_settings(model, optimizer, cfg))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return list(state["rows"]), state["step"] + 1
