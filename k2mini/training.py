"""The training loop: deterministic batches, balancing, MuonClip, and a history of what MoE people watch.

`train(model, data, optimizer, steps)` returns a pandas DataFrame with one row per logged step. Runs are
deterministic given a seed on a given machine (batches are a function of (seed, step)), checkpoint
atomically (keeping the previous checkpoint too; see train_checkpoints.py), resume to the same numbers,
and stop cleanly when the loss, a gradient, a max logit or the weights stop being finite.
Under `torchrun` (torch.distributed initialized) each rank takes its share of every global batch and
gradients are averaged by DistributedDataParallel; router loads and max logits are reduced across ranks
so the correction-bias update and QK-Clip are identical everywhere.

Read top to bottom: the settings (`TrainConfig`, `lr_factor`), one training step (`train_step`),
evaluation (`evaluate`), the history row (`history_row`), checkpoints (`save_checkpoint`,
`resume_from`), and `train`, which strings them together.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .balance import METHODS, loss_free_update, max_violation, sequence_aux_loss, switch_aux_loss
from .optim.max_logits import TakesMaxLogits
from .optim.muon import NonFiniteGradientError
from .locks import LockedError
from .train_checkpoints import (LAST, PREV, check_finite_state, check_settings, existing_checkpoints, load_checkpoint,
                                newest_good, own_checkpoint_dir, run_settings, save_checkpoint, set_aside_diverged)

__all__ = [
    "train",
    "TrainConfig",
    "NonFiniteLossError",
    "lr_factor",
    "train_step",
    "StepResult",
    "evaluate",
    "history_row",
    "save_checkpoint",
    "resume_from",
]


class NonFiniteLossError(FloatingPointError):
    """Raised (with on_nonfinite="raise") when training diverges: the loss, the gradient norm, a max
    attention logit or (at a checkpoint) a weight stops being finite. The message names the step, what
    was not finite and the last good checkpoint."""


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 16  # global, across ranks
    seq_len: int = 128
    seed: int = 0
    balancing: str = "loss_free"
    bias_update_speed: float = 1e-3  # u of the loss-free rule
    aux_alpha: float = 1e-2  # Switch/GShard auxiliary loss weight
    seq_aux_alpha: float = 1e-4  # DeepSeek-V3's sequence-wise loss weight
    schedule: str = "constant"  # or "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak lr
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    checkpoint_every: int | None = None

    def __post_init__(self):
        if self.balancing not in METHODS:
            raise ValueError(f"balancing must be one of {METHODS}, got {self.balancing!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        # (field, lowest allowed value): ints; 0 for eval_every means never
        for name, low in (("steps", 0), ("batch_size", 1), ("seq_len", 1), ("seed", 0), ("warmup_steps", 0),
                          ("eval_every", 0), ("eval_batches", 1), ("log_every", 1)):
            _check_int(self, name, low)
        if self.checkpoint_every is not None:
            _check_int(self, "checkpoint_every", 1)
        for name in ("bias_update_speed", "aux_alpha", "seq_aux_alpha"):
            _check_real(self, name, lambda v: v >= 0, ">= 0")
        _check_real(self, "min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
        if self.grad_clip is not None:
            _check_real(self, "grad_clip", lambda v: v > 0, "> 0 (or None for no clipping)")

    def evaluates_at(self, step: int) -> bool:
        """Whether step `step` (0-based) ends with an evaluation: every eval_every steps and the last."""
        return bool(self.eval_every) and ((step + 1) % self.eval_every == 0 or step + 1 == self.steps)

    def logs_at(self, step: int) -> bool:
        """Whether step `step` adds a history row: every log_every steps, at evaluations and the last."""
        return (step + 1) % self.log_every == 0 or self.evaluates_at(step) or step + 1 == self.steps


def _check_int(cfg, name: str, low: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")


def _check_real(cfg, name: str, ok, what: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise ValueError(f"TrainConfig.{name} must be a finite number {what}, got {v!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Ranks


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------
# One training step


@dataclass
class StepResult:
    """What one step measured, reduced across ranks. When something was not finite, `problem` says what
    (e.g. "training loss became nan") and the step changed nothing."""

    loss: float  # mean next-token cross-entropy of the global batch
    aux_loss: float = 0.0  # the balancing loss added to it (aux_loss / loss_free+seq_aux)
    grad_norm: float = float("nan")  # before clipping
    max_logits: torch.Tensor | None = None  # (layers, heads), max over ranks
    loads: torch.Tensor | None = None  # (moe layers, E) token-slots, summed over ranks
    problem: str | None = None  # what was not finite, if anything

    @property
    def finite(self) -> bool:
        return self.problem is None and math.isfinite(self.loss)


def _local_batch(data, step: int, cfg: TrainConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step `step`'s global batch."""
    rank, world = _world()
    local = slice(rank * (cfg.batch_size // world), (rank + 1) * (cfg.batch_size // world))
    x, y = data.batch_for_step("train", step, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    return x[local].to(device), y[local].to(device)


def _balancing_loss(routers, cfg: TrainConfig, device) -> torch.Tensor:
    """The auxiliary loss of the balancing method, averaged over MoE layers (zero for the others)."""
    if cfg.balancing == "aux_loss":
        return sum(switch_aux_loss(r.scores, r.indices, cfg.aux_alpha) for r in routers) / max(len(routers), 1)
    if cfg.balancing == "loss_free+seq_aux":
        return sum(sequence_aux_loss(r.scores, r.indices, cfg.seq_aux_alpha) for r in routers) / max(len(routers), 1)
    return torch.zeros((), device=device)


def _backward(model, optimizer, loss: torch.Tensor, grad_clip: float | None) -> float:
    """Gradients of `loss` (averaged over ranks by DDP), clipped to `grad_clip`; the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if getattr(model, "expert_parallel", None) is not None:  # experts differ per rank: a norm over all of them
        from .parallel.clip import clip_grad_norm_

        return clip_grad_norm_(model, grad_clip)
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


def _optimizer_step(optimizer, max_logits: torch.Tensor) -> None:
    if isinstance(optimizer, TakesMaxLogits):  # QK-Clip (MuonClip) needs them; MuonAdamW records them
        optimizer.step(max_logits=max_logits)
    else:
        optimizer.step()


@torch.no_grad()
def _update_correction_biases(moe_layers, loads: torch.Tensor, speed: float) -> None:
    """The loss-free rule on this step's loads, after the optimizer step."""
    for layer, load in zip(moe_layers, loads):
        bias = layer.mlp.gate.e_score_correction_bias
        bias.copy_(loss_free_update(bias, load, speed))


def train_step(model, net, optimizer, data, step: int, cfg: TrainConfig) -> StepResult:
    """Step `step`: set the scheduled lr, forward this rank's share of the batch, and unless the loss
    is non-finite, backward, clip, take the optimizer step and update the correction biases.
    `net` is `model` or its DistributedDataParallel wrapper."""
    world = _world()[1]
    factor = lr_factor(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * factor
    device = next(model.parameters()).device
    x, y = _local_batch(data, step, cfg, device)

    out = net(x, telemetry=True)
    tel = out.telemetry
    lm_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
    aux = _balancing_loss(tel.routers, cfg, device)
    loss_value = _all_reduce(lm_loss.detach().clone()).item() / world
    if not math.isfinite(loss_value):
        return StepResult(loss=loss_value, problem=f"training loss became {loss_value}")

    grad_norm = _backward(model, optimizer, lm_loss + aux, cfg.grad_clip)
    max_logits = _all_reduce(tel.max_logits.detach().clone(), dist.ReduceOp.MAX if world > 1 else None)
    loads = _all_reduce(tel.loads.detach().clone()) if tel.routers else None
    # the same checks for every optimizer, before any of them changes a weight
    if not math.isfinite(grad_norm):
        return StepResult(loss_value, grad_norm=grad_norm, problem=f"gradient norm became {grad_norm}")
    if not bool(torch.isfinite(max_logits).all()):
        return StepResult(loss_value, grad_norm=grad_norm, problem="a max attention logit became inf or nan")
    try:
        _optimizer_step(optimizer, max_logits)
    except NonFiniteGradientError as e:  # the optimizer's own check; it changed nothing
        return StepResult(loss_value, grad_norm=grad_norm, problem=f"a gradient became non-finite ({e})")
    if cfg.balancing.startswith("loss_free") and loads is not None:
        _update_correction_biases(model.moe_layers(), loads, cfg.bias_update_speed)
    return StepResult(loss_value, float(aux.detach()), grad_norm, max_logits, loads)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, data, batch_size: int, seq_len: int, max_batches: int) -> float:
    """Mean next-token cross-entropy over a fixed set of validation batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for x, y in data.iter_val_batches(batch_size, seq_len, max_batches=max_batches):
        x, y = x.to(device), y.to(device)
        logits = model(x).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        n += y.numel()
    model.train(was_training)
    return total / max(n, 1)


# ----------------------------------------------------------------------------------------------
# The history row


def _optimizer_metrics(optimizer) -> dict:
    m = getattr(optimizer, "last_metrics", None)
    if not m:
        return {}
    out = {}
    for k, v in dict(m).items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else None
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def history_row(step: int, result: StepResult, optimizer, moe_layers, cfg: TrainConfig) -> dict:
    """One history row of a finite step (val_loss NaN and no wall_time yet: `train` fills them in).

    Columns: step, tokens, lr, train_loss, aux_loss, val_loss, grad_norm, max_logit and max_logit_l{i}
    per layer, maxvio (mean over MoE layers) and maxvio_l{i}, load ([moe_layers, E] token-slots),
    heads_clipped (MuonClip), and the optimizer's other metrics (update_rms/...)."""
    row = {
        "step": step,
        "tokens": (step + 1) * cfg.batch_size * cfg.seq_len,
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": result.loss,
        "aux_loss": result.aux_loss,
        "val_loss": float("nan"),
        "grad_norm": result.grad_norm,
        "max_logit": float(result.max_logits.max()),
    }
    row.update({f"max_logit_l{i}": float(v) for i, v in enumerate(result.max_logits.amax(-1))})
    if result.loads is not None:
        vio = max_violation(result.loads)
        row["maxvio"] = float(vio.mean())
        row.update({f"maxvio_l{layer.index}": float(v) for layer, v in zip(moe_layers, vio)})
        row["load"] = result.loads.to(torch.int64).cpu()
    metrics = _optimizer_metrics(optimizer)
    row["heads_clipped"] = metrics.get("qk_clip/heads_clipped", 0.0)
    row.update({k: v for k, v in metrics.items() if not k.startswith("max_logit")})
    return row


def _nonfinite_row(step: int, result: StepResult, optimizer, cfg: TrainConfig, wall_time: float) -> dict:
    return {"step": step, "tokens": (step + 1) * cfg.batch_size * cfg.seq_len, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": result.loss, "grad_norm": result.grad_norm, "wall_time": wall_time}


def _history_frame(rows: list[dict], cfg: TrainConfig, stop_reason: str, world: int):
    import pandas as pd

    history = pd.DataFrame(rows)
    if "load" in history:
        history["load"] = [None if not isinstance(v, torch.Tensor) else v.numpy() for v in history["load"]]
    history.attrs.update(
        {"train_config": asdict(cfg), "stop_reason": stop_reason, "diverged": stop_reason != "completed", "world_size": world}
    )
    return history


# ----------------------------------------------------------------------------------------------
# Checkpoints: <checkpoint_dir>/last.pt and prev.pt, written by rank 0 (train_checkpoints.py)


def resume_from(path: str, model, optimizer, cfg: TrainConfig | None = None) -> tuple[list[dict], int]:
    """Load model and optimizer state from a checkpoint (checksum verified); return its history rows and
    the next step. With `cfg`, a checkpoint of other settings (model config, optimizer kind or
    hyperparameters, training settings) is refused with a ValueError naming them, before anything loads."""
    state = load_checkpoint(path)
    if cfg is not None:
        check_settings(path, state.get("settings"), run_settings(model, optimizer, cfg))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return list(state["rows"]), state["step"] + 1


@contextmanager
def _owning(checkpoint_dir):
    """Rank 0 holds checkpoint_dir for the run (train_checkpoints.own_checkpoint_dir); if another run
    has it (or its lock file cannot be written), every rank raises, so that none waits for the others
    in a collective."""
    if checkpoint_dir is None:
        yield
        return
    rank, world = _world()
    with ExitStack() as stack:
        refusal = None
        if rank == 0:
            try:
                stack.enter_context(own_checkpoint_dir(checkpoint_dir))
            except Exception as e:  # refused, or the lock file could not be written
                refusal = e
        if world > 1:
            said = [None if refusal is None else (isinstance(refusal, LockedError), str(refusal))]
            dist.broadcast_object_list(said, src=0)
            if said[0] is not None and refusal is None:
                refusal = (LockedError if said[0][0] else RuntimeError)(f"rank 0: {said[0][1]}")
        if refusal is not None:
            raise refusal
        yield


def _checkpoint_path(checkpoint_dir, resume: bool, overwrite: bool) -> str | None:
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
# The loop


def _resolve_config(steps: int | None, config: TrainConfig | None, kwargs: dict) -> TrainConfig:
    if config is None:
        if steps is None:
            raise ValueError("train() needs steps or a TrainConfig")
        return TrainConfig(steps=steps, **kwargs)
    if kwargs or steps is not None:
        raise ValueError("pass either a TrainConfig or steps + keyword settings, not both")
    return config


def _stop_on_nonfinite(problem: str, step: int, ckpt_path: str | None, on_nonfinite: str, reason: str,
                       good_before: int | None = None) -> str:
    """Raise NonFiniteLossError, or warn; returns the stop reason. The last good checkpoint is the newest
    saved after a step < good_before - 1 (default `step`): later weights are the ones that diverged. If
    that is prev.pt, rank 0 sets last.pt aside and makes prev.pt the last.pt that resume=True continues."""
    good = newest_good(os.path.dirname(ckpt_path), step if good_before is None else good_before) if ckpt_path else None
    note = ""
    if good is not None and good.name == PREV and _world()[0] == 0:
        good = set_aside_diverged(good.parent)
        note = f" (it was {PREV}; the newer checkpoint, whose weights diverged, is now {good.parent}/diverged-step*.pt)"
    msg = (f"{problem} at step {step}; stopping. "
           + (f"The last good checkpoint is {good}{note}." if good else "No good checkpoint was written."))
    if on_nonfinite == "raise":
        raise NonFiniteLossError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)  # at train()'s caller
    return reason


def _problem_reason(result: StepResult, step: int) -> str:
    if not math.isfinite(result.loss):
        return f"non-finite loss at step {step}"
    return f"non-finite gradient or max logit at step {step}"


def _save_or_stop(ckpt_path, model, optimizer, step, rows, cfg, first: bool, on_nonfinite: str) -> str | None:
    """Save a checkpoint after `step` (rank 0; the other ranks only check, so that all stop together);
    if the weights or optimizer state are not finite, save nothing and stop as for a divergence
    (returns the stop reason)."""
    try:
        if _world()[0] == 0:
            save_checkpoint(ckpt_path, model, optimizer, step, rows, cfg, keep_previous=not first)
        else:
            check_finite_state(model, optimizer, step)
    except FloatingPointError as e:
        return _stop_on_nonfinite(f"{e}", step, ckpt_path, on_nonfinite,
                                  f"non-finite weights after step {step}", good_before=step + 1)
    return None


def train(
    model,
    data,
    optimizer,
    steps: int | None = None,
    *,
    config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_nonfinite: str = "stop",
    overwrite: bool = False,
    progress: bool = True,
    callback=None,
    **kwargs,
):
    """Train `model` on `data` (a TokenDataset) with `optimizer`; return the history DataFrame.

    Pass either `steps` and TrainConfig fields as keywords (`batch_size=`, `balancing=`, ...) or a
    TrainConfig. Balancing: "none", "aux_loss" (Switch/GShard, aux_alpha), "loss_free" (bias rule
    with speed bias_update_speed, after every optimizer step, on that step's loads), or
    "loss_free+seq_aux" (plus DeepSeek-V3's sequence-wise loss, seq_aux_alpha).
    The optimizer's base lrs are the peak; the schedule scales them every step. An optimizer that is a
    `k2mini.optim.TakesMaxLogits` (MuonClip, and every `build_optimizer` kind) gets the step's max
    logits: `optimizer.step(max_logits=...)`.

    History columns: see `history_row`, plus wall_time. `history.attrs` holds the run's settings and
    how it ended. `callback(step, last row or None)` runs after every step.

    Checkpoints (every `checkpoint_every` steps and at the end, into `checkpoint_dir`): `last.pt`, and
    `prev.pt` the one before. `resume=True` continues from `last.pt` (refused, by name, if its settings
    differ; a damaged file is a `CheckpointDamagedError`); a directory that holds another run's
    checkpoints is refused unless `resume=True` or `overwrite=True`. While it trains, the run owns
    `checkpoint_dir` (a lock file, `.run.lock`): another run into it, in this process or another, is a
    `k2mini.locks.LockedError` naming the holder. A full disk while saving is a `k2mini.atomic.WriteError`
    (an OSError keeping the errno) naming the checkpoint.
    Divergence (a non-finite loss, gradient norm or max logit, or non-finite weights at a checkpoint)
    changes nothing and, with `on_nonfinite="stop"`, ends the run with a RuntimeWarning and
    `history.attrs["stop_reason"]`; with `"raise"`, a NonFiniteLossError naming the step. Either
    names the last good checkpoint, and no non-finite state is ever saved.
    """
    cfg = _resolve_config(steps, config, kwargs)
    if on_nonfinite not in ("stop", "raise"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
    rank, world = _world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world}")
    # stacked experts: every parameter is used every step, as DDP expects
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    moe_layers = model.moe_layers()
    for g in optimizer.param_groups:
        g.setdefault("peak_lr", g["lr"])

    if checkpoint_dir is not None and getattr(model, "expert_parallel", None) is not None:
        raise ValueError("checkpoints of an expert-parallel model (k2mini.parallel.shard_experts) are not supported "
                         "yet: each rank holds other experts; train without checkpoint_dir")
    with _owning(checkpoint_dir):  # a second run into the same checkpoint_dir is refused, naming this one
        ckpt_path = _checkpoint_path(checkpoint_dir, resume, overwrite)
        rows: list[dict] = []
        start = 0
        if resume and os.path.exists(ckpt_path):
            rows, start = resume_from(ckpt_path, model, optimizer, cfg)
        first_save = not resume  # a new run's first save drops an overwritten run's prev.pt

        model.train()
        stop_reason = "completed"
        t0 = time.perf_counter() - (rows[-1]["wall_time"] if rows else 0.0)
        bar = tqdm(range(start, cfg.steps), disable=not progress or rank != 0, desc="train", initial=start, total=cfg.steps)
        for step in bar:
            result = train_step(model, net, optimizer, data, step, cfg)
            if not result.finite:
                stop_reason = _stop_on_nonfinite(result.problem, step, ckpt_path, on_nonfinite,
                                                 _problem_reason(result, step))
                rows.append(_nonfinite_row(step, result, optimizer, cfg, time.perf_counter() - t0))
                break
            if cfg.logs_at(step):
                row = history_row(step, result, optimizer, moe_layers, cfg)
                if cfg.evaluates_at(step):  # the same batches on every rank
                    row["val_loss"] = evaluate(model, data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
                row["wall_time"] = time.perf_counter() - t0
                rows.append(row)
                bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
            if callback is not None:
                callback(step, rows[-1] if rows else None)
            if ckpt_path and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                stopped = _save_or_stop(ckpt_path, model, optimizer, step, rows, cfg, first_save, on_nonfinite)
                first_save = False
                if stopped:
                    stop_reason = stopped
                    break
        bar.close()
        saved_last = cfg.checkpoint_every and cfg.steps % cfg.checkpoint_every == 0  # prev.pt must stay the one before
        if ckpt_path and stop_reason == "completed" and cfg.steps > start and not saved_last:
            stop_reason = _save_or_stop(ckpt_path, model, optimizer, cfg.steps - 1, rows, cfg, first_save,
                                        on_nonfinite) or "completed"
        return _history_frame(rows, cfg, stop_reason, world)
