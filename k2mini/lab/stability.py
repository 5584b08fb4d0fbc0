"""Summaries of optimizer-stability sweeps (notebook 04): one row per run, the best run per optimizer,
tokens to reach a loss, and tables rounded to what a reader compares.

    table = summarize(run_sweep(specs))      # peak / final max logit, losses, clipping, per run
    format_summary(table)                    # logits to 2 significant digits, losses to 2 decimals
"""

from __future__ import annotations

import math
from typing import Sequence

from .experiments import RunResult, RunSpec

__all__ = ["summarize", "optimizer_group", "best_runs", "tokens_to_reach", "significant", "format_summary", "sweep_specs",
           "long_specs", "clips_per_part"]


def summarize(results: Sequence[RunResult], tail: int = 20):
    """One row per run: optimizer, lr, tau, peak max logit, final max logit (mean of the last `tail`
    steps), final train/val loss, diverged, share of heads ever clipped, last step that clipped, and
    the worst post-clip max logit over tau (MuonClip)."""
    import pandas as pd

    rows = []
    for r in results:
        h, s = r.history, r.spec
        finite = h[h["train_loss"].map(lambda v: math.isfinite(v))] if len(h) else h
        row = {
            "run": r.name,
            "group": optimizer_group(s),
            "optimizer": s.optimizer,
            "lr": s.lr,
            "tau": s.tau if s.optimizer == "muonclip" else float("nan"),
            "weight_decay": s.weight_decay,
            "steps": s.steps,
            "peak_max_logit": r.peak_max_logit(),
            "final_max_logit": float(finite["max_logit"].tail(tail).mean()) if "max_logit" in finite and len(finite) else float("nan"),
            "final_train_loss": float(finite["train_loss"].tail(tail).mean()) if len(finite) else float("nan"),
            "final_val_loss": r.final_val_loss(),
            "diverged": r.diverged,
        }
        if s.optimizer == "muonclip":
            clipped = h.get("qk_clip/heads_clipped")
            ever = h.get("qk_clip/frac_heads_ever_clipped")
            row["frac_heads_ever_clipped"] = float(ever.dropna().iloc[-1]) if ever is not None and ever.notna().any() else 0.0
            active = h["step"][clipped > 0] if clipped is not None else h["step"][:0]
            row["last_clip_step"] = int(active.max()) if len(active) else -1
            row["clip_steps"] = int(len(active))
            post = h.get("post_clip_max_logit")
            row["worst_post_clip_over_tau"] = (float(post.max() / s.tau) if post is not None and post.notna().any()
                                               else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def optimizer_group(spec) -> str:
    """'adamw', 'muon' or 'muonclip tau=30': what runs are grouped, compared and coloured by."""
    if spec.optimizer == "muonclip":
        return f"muonclip tau={spec.tau:g}"
    return spec.optimizer


def best_runs(results: Sequence[RunResult]) -> list[RunResult]:
    """Per optimizer group (in order of appearance), the finished run with the lowest final val loss."""
    best: dict[str, RunResult] = {}
    for r in results:
        loss = r.final_val_loss()
        if r.diverged or not math.isfinite(loss):
            continue
        g = optimizer_group(r.spec)
        if g not in best or loss < best[g].final_val_loss():
            best[g] = r
    order = list(dict.fromkeys(optimizer_group(r.spec) for r in results))
    return [best[g] for g in order if g in best]


def tokens_to_reach(result: RunResult, loss: float) -> float:
    """Training tokens after which the run's validation loss first reaches `loss` (linear interpolation
    between evaluations; the first evaluation counts as reached if it is already below); NaN if never."""
    v = result.history[["tokens", "val_loss"]].dropna()
    if not len(v):
        return float("nan")
    tok, val = v["tokens"].to_numpy(dtype=float), v["val_loss"].to_numpy(dtype=float)
    if val[0] <= loss:
        return float(tok[0])
    for i in range(1, len(val)):
        if val[i] <= loss:
            t = (val[i - 1] - loss) / (val[i - 1] - val[i])
            return float(tok[i - 1] + t * (tok[i] - tok[i - 1]))
    return float("nan")


def significant(x: float, digits: int = 2) -> str:
    """x rounded to `digits` significant digits, as a plain decimal string ("-" for NaN or None)."""
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    rounded = round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1)
    return f"{rounded:.{max(0, digits - 1 - int(math.floor(math.log10(abs(rounded)))))}f}"


def format_summary(table, *, logit_digits: int = 2, loss_decimals: int = 2, columns: Sequence[str] | None = None):
    """`summarize(...)` rounded to what reproduces across machines: logits to `logit_digits` significant
    digits, losses to `loss_decimals` decimals, shares to 2 decimals; returns a DataFrame of strings."""
    import pandas as pd

    cols = list(columns or [c for c in ("group", "lr", "peak_max_logit", "final_max_logit", "final_val_loss",
                                        "diverged", "frac_heads_ever_clipped", "last_clip_step") if c in table])
    out = pd.DataFrame(index=table.index)
    for c in cols:
        col = table[c]
        if "max_logit" in c:
            out[c] = [significant(float(v), logit_digits) for v in col]
        elif "loss" in c:
            out[c] = ["-" if not math.isfinite(float(v)) else f"{float(v):.{loss_decimals}f}" for v in col]
        elif c.startswith("frac") or c.startswith("share"):
            out[c] = ["-" if not math.isfinite(float(v)) else f"{float(v):.2f}" for v in col]
        elif c == "lr":
            out[c] = [f"{float(v):g}" for v in col]
        elif c == "last_clip_step":
            out[c] = ["-" if not math.isfinite(float(v)) else ("never" if v < 0 else str(int(v))) for v in col]
        else:
            out[c] = col.astype(str) if col.dtype == bool else col
    return out.reset_index(drop=True)


def sweep_specs(*, preset: str, steps: int, lrs: Sequence[float], tau: float, tau_k2: float, weight_decay: float,
                batch_size: int, seq_len: int, seed: int):
    """Notebook 04's sweep: AdamW, Muon and MuonClip(tau) at every lr, plus MuonClip(tau_k2) at the three
    largest, all on the same tokens and seed, with a cosine schedule and 10% warm-up."""

    common = dict(preset=preset, steps=steps, weight_decay=weight_decay, batch_size=batch_size, seq_len=seq_len,
                  seed=seed, data_seed=seed, eval_every=steps // 6, eval_batches=4,
                  train={"schedule": "cosine", "warmup_steps": steps // 10})
    specs = [RunSpec(optimizer=k, lr=lr, tau=tau, **common) for k in ("adamw", "muon", "muonclip") for lr in lrs]
    return specs + [RunSpec(optimizer="muonclip", lr=lr, tau=tau_k2, **common) for lr in lrs[-3:]]


def long_specs(spec, factor: int = 2):
    """`spec` run `factor` times as long (warm-up and evaluations scaled with it), with the cosine decay,
    and the same run at a constant learning rate (the control: nothing decays)."""
    steps = factor * spec.steps
    longer = spec.replace(steps=steps, eval_every=steps // 6, train={"warmup_steps": steps // 10})
    return longer, longer.replace(train={"schedule": "constant"}, label=f"{longer.name} constant lr")


def clips_per_part(history, steps: int, parts: int = 6):
    """Steps with at least one clipped head in each of `parts` equal parts of a `steps`-step run (a list)."""
    clipped = (history["qk_clip/heads_clipped"].fillna(0) > 0).to_numpy()
    part = (history["step"].to_numpy() * parts) // steps
    return [int(clipped[part == p].sum()) for p in range(parts)]
