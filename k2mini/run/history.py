"""The history a training run returns: one row per logged step, as a pandas DataFrame.

`history_row` turns a finite step's StepResult (see training.py) into a row; `nonfinite_row` is the
last row of a run that diverged; `history_frame` makes the DataFrame and records in `attrs` the run's
settings and how it ended.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..balance import max_violation

__all__ = ["history_row", "nonfinite_row", "history_frame", "optimizer_metrics"]


def optimizer_metrics(optimizer) -> dict:
    """The optimizer's `last_metrics` (k2mini's optimizers have them) that are single numbers, as floats."""
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


def history_row(step: int, result, optimizer, moe_layers, cfg) -> dict:
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
    # per-layer figures read as one list each (tolist gives what float() of each element gives)
    row.update({f"max_logit_l{i}": v for i, v in enumerate(result.max_logits.amax(-1).tolist())})
    if result.loads is not None:
        vio = max_violation(result.loads)
        row["maxvio"] = float(vio.mean())
        row.update({f"maxvio_l{layer.index}": v for layer, v in zip(moe_layers, vio.tolist())})
        row["load"] = result.loads.to(torch.int64).cpu()
    metrics = optimizer_metrics(optimizer)
    row["heads_clipped"] = metrics.get("qk_clip/heads_clipped", 0.0)
    row.update({k: v for k, v in metrics.items() if not k.startswith("max_logit")})
    return row


def nonfinite_row(step: int, result, optimizer, cfg, wall_time: float) -> dict:
    """The row of the step at which the run diverged: what it measured before stopping."""
    return {"step": step, "tokens": (step + 1) * cfg.batch_size * cfg.seq_len, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": result.loss, "grad_norm": result.grad_norm, "wall_time": wall_time}


def history_frame(rows: list[dict], cfg, stop_reason: str, world: int):
    """The rows as a DataFrame (loads as numpy arrays); attrs: train_config, stop_reason, diverged, world_size."""
    import pandas as pd

    history = pd.DataFrame(rows)
    if "load" in history:
        history["load"] = [None if not isinstance(v, torch.Tensor) else v.numpy() for v in history["load"]]
    history.attrs.update(
        {"train_config": asdict(cfg), "stop_reason": stop_reason, "diverged": stop_reason != "completed", "world_size": world}
    )
    return history
