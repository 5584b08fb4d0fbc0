"""The training loop: deterministic batches, balancing, MuonClip, and a history of what MoE people watch.

`train(model, data, optimizer, steps)` returns a pandas DataFrame with one row per logged step. Runs are
deterministic given a seed on a given machine (batches are a function of (seed, step)), checkpoint
atomically, resume to the same numbers, and stop cleanly on a non-finite loss.
Under `torchrun` (torch.distributed initialized) each rank takes its share of every global batch and
gradients are averaged by DistributedDataParallel; router loads and max logits are reduced across ranks
so the correction-bias update and QK-Clip are identical everywhere.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import atomic_write
from .balance import METHODS, loss_free_update, sequence_aux_loss, switch_aux_loss
from .balance import max_violation


class NonFiniteLossError(FloatingPointError):
    """Raised (with on_nonfinite="raise") when the training loss stops being finite."""


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
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.balancing not in METHODS:
            raise ValueError(f"balancing must be one of {METHODS}, got {self.balancing!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.steps < 0 or self.batch_size <= 0 or self.seq_len <= 0:
            raise ValueError("steps must be >= 0, batch_size and seq_len > 0")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _steps_with_max_logits(optimizer) -> bool:
    try:
        return "max_logits" in inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False


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


def _save_checkpoint(path: str, model, optimizer, step: int, rows: list, cfg: TrainConfig) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rows": rows,
        "train_config": asdict(cfg),
    }
    with atomic_write(path) as f:  # a reader sees the old checkpoint or the new one, never half of one
        torch.save(state, f)


def _load_checkpoint(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


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
    progress: bool = True,
    callback=None,
    **kwargs,
):
    """Train `model` on `data` (a TokenDataset) with `optimizer`; return the history DataFrame.

    Pass either `steps` and TrainConfig fields as keywords (`batch_size=`, `balancing=`, ...) or a
    TrainConfig. Balancing: "none", "aux_loss" (Switch/GShard, aux_alpha), "loss_free" (bias rule
    with speed bias_update_speed, after every optimizer step, on that step's loads), or
    "loss_free+seq_aux" (plus DeepSeek-V3's sequence-wise loss, seq_aux_alpha).
    The optimizer's base lrs are the peak; the schedule scales them every step.

    History columns: step, tokens, lr, train_loss, aux_loss, val_loss (NaN between evaluations),
    grad_norm, max_logit and max_logit_l{i} per layer, maxvio (mean over MoE layers) and maxvio_l{i},
    load (array [moe_layers, E] of token-slots), heads_clipped (MuonClip), update_rms/... (optimizer
    metrics), wall_time. `history.attrs` holds the run's settings and how it ended.
    """
    import pandas as pd

    if config is None:
        if steps is None:
            raise ValueError("train() needs steps or a TrainConfig")
        config = TrainConfig(steps=steps, **kwargs)
    elif kwargs or steps is not None:
        raise ValueError("pass either a TrainConfig or steps + keyword settings, not both")
    cfg = config
    if on_nonfinite not in ("stop", "raise"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
    rank, world = _world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world}")
    local_bs = cfg.batch_size // world
    device = next(model.parameters()).device
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)  # stacked experts: every parameter is used every step
    moe_layers = model.moe_layers()
    pass_max_logits = _steps_with_max_logits(optimizer)
    for g in optimizer.param_groups:
        g.setdefault("peak_lr", g["lr"])

    ckpt_path = None
    rows: list[dict] = []
    start = 0
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        ckpt_path = os.path.join(os.fspath(checkpoint_dir), "last.pt")
        if resume and os.path.exists(ckpt_path):
            state = _load_checkpoint(ckpt_path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rows = list(state["rows"])
            start = state["step"] + 1
    elif resume:
        raise ValueError("resume=True needs a checkpoint_dir")

    model.train()
    stop_reason = "completed"
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t0 = time.perf_counter() - (rows[-1]["wall_time"] if rows else 0.0)
    bar = tqdm(range(start, cfg.steps), disable=not progress or rank != 0, desc="train", initial=start, total=cfg.steps)
    for step in bar:
        factor = lr_factor(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * factor
        x, y = data.batch_for_step("train", step, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        x, y = x[rank * local_bs : (rank + 1) * local_bs].to(device), y[rank * local_bs : (rank + 1) * local_bs].to(device)

        out = net(x, telemetry=True)
        tel = out.telemetry
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        aux = torch.zeros((), device=device)
        if cfg.balancing == "aux_loss":
            aux = sum(switch_aux_loss(r.scores, r.indices, cfg.aux_alpha) for r in tel.routers) / max(len(tel.routers), 1)
        elif cfg.balancing == "loss_free+seq_aux":
            aux = sum(sequence_aux_loss(r.scores, r.indices, cfg.seq_aux_alpha) for r in tel.routers) / max(len(tel.routers), 1)
        loss = lm_loss + aux

        loss_value = _all_reduce(lm_loss.detach().clone()).item() / world
        if not math.isfinite(loss_value):
            msg = (f"training loss became {loss_value} at step {step}; stopping. "
                   + (f"The last good checkpoint is {ckpt_path}." if ckpt_path and os.path.exists(ckpt_path) else "No checkpoint was written."))
            if on_nonfinite == "raise":
                raise NonFiniteLossError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            rows.append({"step": step, "tokens": (step + 1) * tokens_per_step, "lr": optimizer.param_groups[0]["lr"],
                         "train_loss": loss_value, "wall_time": time.perf_counter() - t0})
            stop_reason = f"non-finite loss at step {step}"
            break

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float("nan")
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()

        max_logits = _all_reduce(tel.max_logits.detach().clone(), dist.ReduceOp.MAX if world > 1 else None)
        loads = _all_reduce(tel.loads.detach().clone()) if tel.routers else None
        if pass_max_logits:
            optimizer.step(max_logits=max_logits)
        else:
            optimizer.step()
        if cfg.balancing.startswith("loss_free") and loads is not None:
            with torch.no_grad():
                for layer, load in zip(moe_layers, loads):
                    bias = layer.mlp.gate.e_score_correction_bias
                    bias.copy_(loss_free_update(bias, load, cfg.bias_update_speed))

        evaluate_now = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)
        if (step + 1) % cfg.log_every == 0 or evaluate_now or step + 1 == cfg.steps:
            row = {
                "step": step,
                "tokens": (step + 1) * tokens_per_step,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_value,
                "aux_loss": float(aux.detach()),
                "val_loss": float("nan"),
                "grad_norm": grad_norm,
                "max_logit": float(max_logits.max()),
            }
            row.update({f"max_logit_l{i}": float(v) for i, v in enumerate(max_logits.amax(-1))})
            if loads is not None:
                vio = max_violation(loads)
                row["maxvio"] = float(vio.mean())
                row.update({f"maxvio_l{layer.index}": float(v) for layer, v in zip(moe_layers, vio)})
                row["load"] = loads.to(torch.int64).cpu()
            metrics = _optimizer_metrics(optimizer)
            row["heads_clipped"] = metrics.get("qk_clip/heads_clipped", 0.0)
            row.update({k: v for k, v in metrics.items() if not k.startswith("max_logit")})
            if evaluate_now:
                row["val_loss"] = evaluate(model, data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)  # same batches on every rank
            row["wall_time"] = time.perf_counter() - t0
            rows.append(row)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if callback is not None:
            callback(step, rows[-1] if rows else None)
        if ckpt_path and rank == 0 and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt_path, model, optimizer, step, rows, cfg)
    bar.close()
    if ckpt_path and rank == 0 and stop_reason == "completed" and cfg.steps > start:
        _save_checkpoint(ckpt_path, model, optimizer, cfg.steps - 1, rows, cfg)

    history = pd.DataFrame(rows)
    if "load" in history:
        history["load"] = [None if not isinstance(v, torch.Tensor) else v.numpy() for v in history["load"]]
    history.attrs.update(
        {"train_config": asdict(cfg), "stop_reason": stop_reason, "diverged": stop_reason != "completed", "world_size": world}
    )
    return history
