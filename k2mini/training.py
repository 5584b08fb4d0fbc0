"""The training step's math, read top down, and `train`, which runs it step after step.

One step (`train_step`): set the scheduled lr; forward this rank's share of the global batch with
telemetry; the next-token cross-entropy plus the balancing method's auxiliary loss; backward; the
gradient norm, clipped; the optimizer step (a `TakesMaxLogits` optimizer such as MuonClip gets the
step's max logits, for QK-Clip); then the loss-free rule moves the correction biases on the step's
loads. If the loss, the gradient norm or a max logit is not finite, the step changes nothing and says
what was not finite. `evaluate` is the validation loss.

Processes enter through one seam, a plan from k2mini.parallel (`parallel=`, by default
`plan_of(model)`, see parallel/plan.py): under `torchrun` each rank takes its share of every global
batch, the module the plan wraps the model in averages the gradients (DistributedDataParallel; for an
expert-parallel model, over the replicated part only), and the loss, router loads and max logits are
reduced across ranks, so that the correction-bias update and QK-Clip are identical everywhere.

`train` strings the steps together with the run-keeping in k2mini.run: the history rows, checkpoints
that never lose a good state and resume to the same numbers, the run's ownership of its
checkpoint_dir, and what to do when training diverges. Runs are deterministic given a seed on a given
machine (batches are a function of (seed, step)).

Read top to bottom: the settings (`TrainConfig`, `lr_factor`), one step (`StepResult`, `train_step`),
`evaluate`, and `train`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .balance import METHODS, loss_free_update, sequence_aux_loss, switch_aux_loss
from .checks import check_int, check_real
from .optim.max_logits import TakesMaxLogits
from .optim.muon import NonFiniteGradientError
from .parallel.plan import ParallelPlan, plan_of
from .run.checkpoint_dir import checkpoint_path, owning
from .run.divergence import ON_NONFINITE, NonFiniteLossError, problem_reason, save_or_stop, stop_on_nonfinite
from .run.history import history_frame, history_row, nonfinite_row
from .run.resume_state import resume_from, save_checkpoint

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
    grad_clip: float | None = 1.0  # None: no clipping
    eval_every: int = 50  # 0: never
    eval_batches: int = 4
    log_every: int = 1
    checkpoint_every: int | None = None

    def __post_init__(self):
        if self.balancing not in METHODS:
            raise ValueError(f"balancing must be one of {METHODS}, got {self.balancing!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        for name, low in (("steps", 0), ("batch_size", 1), ("seq_len", 1), ("seed", 0), ("warmup_steps", 0),
                          ("eval_every", 0), ("eval_batches", 1), ("log_every", 1)):
            check_int(getattr(self, name), f"TrainConfig.{name}", low=low)
        if self.checkpoint_every is not None:
            check_int(self.checkpoint_every, "TrainConfig.checkpoint_every", low=1)
        for name in ("bias_update_speed", "aux_alpha", "seq_aux_alpha"):
            check_real(getattr(self, name), f"TrainConfig.{name}", low=0)
        check_real(self.min_lr_ratio, "TrainConfig.min_lr_ratio", low=0, high=1)
        if self.grad_clip is not None:
            check_real(self.grad_clip, "TrainConfig.grad_clip", low=0, low_open=True)

    def evaluates_at(self, step: int) -> bool:
        """Whether step `step` (0-based) ends with an evaluation: every eval_every steps and the last."""
        return bool(self.eval_every) and ((step + 1) % self.eval_every == 0 or step + 1 == self.steps)

    def logs_at(self, step: int) -> bool:
        """Whether step `step` adds a history row: every log_every steps, at evaluations and the last."""
        return (step + 1) % self.log_every == 0 or self.evaluates_at(step) or step + 1 == self.steps


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


def _local_batch(data, step: int, cfg: TrainConfig, parallel: ParallelPlan, device):
    """This rank's share of step `step`'s global batch: (B / world, T) inputs and next-token targets."""
    share = cfg.batch_size // parallel.world
    x, y = data.batch_for_step("train", step, cfg.batch_size, cfg.seq_len, seed=cfg.seed)  # (B, T) each
    mine = slice(parallel.rank * share, (parallel.rank + 1) * share)
    return x[mine].to(device), y[mine].to(device)


def _balancing_loss(routers, cfg: TrainConfig, device) -> torch.Tensor:
    """The auxiliary loss of the balancing method, averaged over MoE layers (zero for the others)."""
    if cfg.balancing == "aux_loss":
        return sum(switch_aux_loss(r.scores, r.indices, cfg.aux_alpha) for r in routers) / max(len(routers), 1)
    if cfg.balancing == "loss_free+seq_aux":
        return sum(sequence_aux_loss(r.scores, r.indices, cfg.seq_aux_alpha) for r in routers) / max(len(routers), 1)
    return torch.zeros((), device=device)


def _optimizer_step(optimizer, max_logits: torch.Tensor) -> None:
    if isinstance(optimizer, TakesMaxLogits):  # QK-Clip (MuonClip) needs them; MuonAdamW records them
        optimizer.step(max_logits=max_logits)
    else:
        optimizer.step()


@torch.no_grad()
def _update_correction_biases(moe_layers, loads: torch.Tensor, speed: float) -> None:
    """The loss-free rule on this step's loads (moe layers, E), after the optimizer step."""
    for layer, load in zip(moe_layers, loads):
        bias = layer.mlp.gate.e_score_correction_bias
        bias.copy_(loss_free_update(bias, load, speed))


def train_step(model, net, optimizer, data, step: int, cfg: TrainConfig,
               parallel: ParallelPlan | None = None) -> StepResult:
    """Step `step`: set the scheduled lr, forward this rank's share of the batch, and unless the loss
    is non-finite, backward, clip, take the optimizer step and update the correction biases.
    `net` is `model` or the module `parallel.wrap(model)` returned; `parallel` defaults to plan_of(model)."""
    parallel = plan_of(model) if parallel is None else parallel
    factor = lr_factor(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * factor
    device = next(model.parameters()).device
    x, y = _local_batch(data, step, cfg, parallel, device)

    out = net(x, telemetry=True)
    tel = out.telemetry
    lm_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())  # logits (B T, V), this rank's mean
    aux = _balancing_loss(tel.routers, cfg, device)
    loss_value = parallel.all_reduce(lm_loss.detach().clone()).item() / parallel.world
    if not math.isfinite(loss_value):
        return StepResult(loss=loss_value, problem=f"training loss became {loss_value}")

    optimizer.zero_grad(set_to_none=True)
    (lm_loss + aux).backward()  # through net: every rank now holds the global batch's gradients
    grad_norm = parallel.clip_grad_norm_(model, cfg.grad_clip)
    max_logits = parallel.all_reduce(tel.max_logits.detach().clone(), "max")  # (layers, heads)
    loads = parallel.all_reduce(tel.loads.detach().clone()) if tel.routers else None  # (moe layers, E)
    # the same checks for every optimizer, before any of them changes a weight
    if not math.isfinite(grad_norm):
        return StepResult(loss_value, grad_norm=grad_norm, problem=f"gradient norm became {grad_norm}")
    if not bool(torch.isfinite(max_logits).all()):
        return StepResult(loss_value, grad_norm=grad_norm, problem="a max attention logit became inf or nan")
    try:
        _optimizer_step(optimizer, max_logits)
    except NonFiniteGradientError as e:  # the optimizer's own check; it changed nothing
        return StepResult(loss_value, grad_norm=grad_norm, problem=f"a gradient became non-finite ({e})")
    # Inside a caller's torch.autocast region, autocast keeps the low-precision copies of the weights it
    # made until the region ends: the next forward would run on this step's weights before the update.
    torch.clear_autocast_cache()
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
# The loop


def _resolve_config(steps: int | None, config: TrainConfig | None, kwargs: dict) -> TrainConfig:
    if config is None:
        if steps is None:
            raise ValueError("train() needs steps or a TrainConfig")
        return TrainConfig(steps=steps, **kwargs)
    if kwargs or steps is not None:
        raise ValueError("pass either a TrainConfig or steps + keyword settings, not both")
    return config


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
    parallel: ParallelPlan | None = None,
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
    `parallel`: how the run spreads over processes (k2mini.parallel's DataParallel or ExpertParallel);
    by default `k2mini.parallel.plan_of(model)`, which knows a model `shard_experts` converted.

    History columns: see `k2mini.run.history.history_row`, plus wall_time. `history.attrs` holds the
    run's settings and how it ended. `callback(step, last row or None)` runs after every step.

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
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
    parallel = plan_of(model) if parallel is None else parallel
    rank, world = parallel.rank, parallel.world
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world}")
    net = parallel.wrap(model)
    moe_layers = model.moe_layers()
    for g in optimizer.param_groups:
        g.setdefault("peak_lr", g["lr"])

    if checkpoint_dir is not None and parallel.checkpoint_refusal:
        raise ValueError(parallel.checkpoint_refusal)
    with owning(checkpoint_dir, rank, world):  # a second run into checkpoint_dir is refused, naming this one
        ckpt_path = checkpoint_path(checkpoint_dir, resume, overwrite)
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
            result = train_step(model, net, optimizer, data, step, cfg, parallel)
            if not result.finite:
                stop_reason = stop_on_nonfinite(result.problem, step, ckpt_path, on_nonfinite,
                                                problem_reason(result.loss, step), rank)
                rows.append(nonfinite_row(step, result, optimizer, cfg, time.perf_counter() - t0))
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
                stopped = save_or_stop(ckpt_path, model, optimizer, step, rows, cfg, first_save, on_nonfinite, rank)
                first_save = False
                if stopped:
                    stop_reason = stopped
                    break
        bar.close()
        saved_last = cfg.checkpoint_every and cfg.steps % cfg.checkpoint_every == 0  # prev.pt must stay the one before
        if ckpt_path and stop_reason == "completed" and cfg.steps > start and not saved_last:
            stop_reason = save_or_stop(ckpt_path, model, optimizer, cfg.steps - 1, rows, cfg, first_save,
                                       on_nonfinite, rank) or "completed"
        return history_frame(rows, cfg, stop_reason, world)
