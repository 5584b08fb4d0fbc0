"""The sparsity study of notebook 05: more routed experts at a fixed number of active ones, paired by seed.

    specs = paired_specs(base, experts=[8, 64], seeds=[0, 1, 2, 3], control=8)
    runs = run_sweep(specs)
    curves = val_curves(runs)                  # one row per (run, evaluation)
    gaps = paired_gaps(curves, more=64, fewer=8)               # (seed, step) -> val loss gap
    noise = paired_gaps(curves, more="8'", fewer=8)            # the same-E control: two inits of E = 8
    compute_to_match(curves, baseline=8)       # steps each E needs to reach E = 8's final loss

Pairing: `RunSpec.seed` draws the initial weights, `data_seed` the batches. Every arm of a seed sees the
same batches in the same order (`data_seed` = the seed), so the per-seed gap between two arms leaves
out the batch-order noise. Its remaining noise is the initialization and the trajectory that follows
from it; the *control* arm measures exactly that: the fewer-experts model again, on the same batches,
from another initialization (`seed + CONTROL_SEED_OFFSET`). All arms the same E: any gap it shows is
noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..atomic import atomic_write
from ..data import default_data_root
from .experiments import RunResult, RunSpec

__all__ = [
    "CONTROL_SEED_OFFSET",
    "arm_name",
    "paired_specs",
    "val_curves",
    "paired_gaps",
    "compute_to_match",
    "dictionary_text",
    "dictionary_corpus",
]

CONTROL_SEED_OFFSET = 1000  # the control's initialization: seed + this, on the batches of `seed`


def arm_name(spec: RunSpec) -> str | int:
    """E (an int) for an arm, ``"<E>'"`` for the same-E control (another initialization of that E)."""
    E = spec.get("n_routed_experts")
    return f"{E}'" if spec.seed != spec.batch_seed else E


def paired_specs(base: RunSpec, experts: Sequence[int], seeds: Sequence[int], control: int | None = None) -> list[RunSpec]:
    """One RunSpec per (seed, E), all of a seed on the batches of that seed (`data_seed` = seed), labelled
    "E=<E>"; with `control`, one more per seed: E = `control` again from another initialization
    (seed + CONTROL_SEED_OFFSET) on the same batches, labelled "E=<control>'"."""
    specs = []
    for s in seeds:
        specs += [base.replace(config={"n_routed_experts": E}, seed=s, data_seed=s, label=f"E={E}") for E in experts]
        if control is not None:
            specs.append(base.replace(config={"n_routed_experts": control}, seed=s + CONTROL_SEED_OFFSET, data_seed=s,
                                      label=f"E={control}'"))
    return specs


def val_curves(runs: Sequence[RunResult]) -> pd.DataFrame:
    """One row per (run, evaluation): arm (E, or "E'" for the control), n_experts, seed (the batches'),
    step (1-based: steps taken), val_loss, train_loss (mean of the steps since the previous evaluation)."""
    rows = []
    for r in runs:
        h = r.history
        if "val_loss" not in h:
            raise ValueError(f"{r.name}: the run has no validation loss (eval_every = 0?)")
        evals = h.dropna(subset=["val_loss"])
        prev = 0
        for i, row in evals.iterrows():
            window = h.loc[prev:i, "train_loss"] if "train_loss" in h else pd.Series(dtype=float)
            rows.append({"arm": arm_name(r.spec), "n_experts": r.spec.get("n_routed_experts"), "seed": r.spec.batch_seed,
                         "step": int(row["step"]) + 1, "val_loss": float(row["val_loss"]),
                         "train_loss": float(window.mean()) if len(window) else float("nan")})
            prev = i + 1
    return pd.DataFrame(rows)


def paired_gaps(curves: pd.DataFrame, more, fewer, metric: str = "val_loss") -> pd.DataFrame:
    """Per-seed gaps `metric(more) - metric(fewer)` at every evaluation: a (seed x step) frame. Negative:
    the `more` arm is ahead. `more` and `fewer` are arms of `curves` (an E, or "E'" for the control)."""
    wide = curves.pivot_table(index=["seed", "step"], columns="arm", values=metric)
    missing = [a for a in (more, fewer) if a not in wide.columns]
    if missing:
        raise ValueError(f"paired_gaps: no runs of arm(s) {missing}; the curves have {list(wide.columns)}")
    return (wide[more] - wide[fewer]).unstack("step").dropna(how="all")


def _first_crossing(steps: np.ndarray, loss: np.ndarray, target: float) -> float:
    """The step at which a falling curve first reaches `target`, linear in log(step) between evaluations;
    NaN when it never does."""
    below = np.nonzero(loss <= target)[0]
    if not len(below):
        return float("nan")
    i = below[0]
    if i == 0:
        return float(steps[0])
    x0, x1, y0, y1 = np.log(steps[i - 1]), np.log(steps[i]), loss[i - 1], loss[i]
    return float(np.exp(x0 + (y0 - target) / (y0 - y1) * (x1 - x0)))


def compute_to_match(curves: pd.DataFrame, baseline=8, target: float | None = None) -> pd.DataFrame:
    """The form of K2's sparsity law (docs/K2_FACTS.md section 5): the training compute
    each configuration needs to reach one validation loss, relative to `baseline`.

    Every arm does the same active work per token, so compute is proportional to steps. `target`
    defaults to the baseline's final mean validation loss. Per arm: the step at which its seed-mean
    curve first reaches the target (log-linear between evaluations; NaN if it never does) and
    `compute_ratio` = baseline's steps / its steps (> 1: it needs less compute). The learning-rate
    schedule is the same for all arms, so this is the compute saving read off one schedule, not a
    scaling-law fit."""
    mean = curves.groupby(["arm", "step"])["val_loss"].mean().unstack("step")
    if baseline not in mean.index:
        raise ValueError(f"compute_to_match: no arm {baseline!r}; arms {list(mean.index)}")
    steps = mean.columns.to_numpy(dtype=float)
    target = float(mean.loc[baseline].iloc[-1]) if target is None else float(target)
    rows = []
    for arm, loss in mean.iterrows():
        rows.append({"arm": arm, "final_val_loss": float(loss.iloc[-1]),
                     "steps_to_target": _first_crossing(steps, loss.to_numpy(dtype=float), target)})
    out = pd.DataFrame(rows).set_index("arm")
    out["compute_ratio"] = out.loc[baseline, "steps_to_target"] / out["steps_to_target"]
    out.attrs["target"] = target
    return out


def dictionary_text(n_pairs: int, n_bytes: int, seed: int = 0, key_len: int = 4, value_len: int = 4) -> str:
    """A corpus where capacity binds early: lines ``key=value`` drawn at random from one fixed dictionary
    of `n_pairs` random lowercase keys and values. The keys are unpredictable (log 26 nats per letter,
    whatever the model); the values are a lookup the model can only learn by storing the dictionary in
    its weights, so the loss on them measures how much of it the parameters hold."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    keys: dict[str, None] = {}
    while len(keys) < n_pairs:
        keys["".join(rng.choice(letters, key_len))] = None
    pairs = [f"{k}={''.join(rng.choice(letters, value_len))}\n" for k in keys]
    line = key_len + value_len + 2
    order = rng.integers(0, n_pairs, n_bytes // line)
    return "".join(pairs[i] for i in order)


def dictionary_corpus(n_pairs: int = 1500, n_bytes: int = 2_000_000, seed: int = 0, root=None) -> str:
    """The path (a string, for `RunSpec.corpus`) of `dictionary_text(n_pairs, n_bytes, seed)`, written once
    under `<data root>/synthetic/` (atomically) and reused."""

    folder = (default_data_root() if root is None else Path(root)) / "synthetic"
    path = folder / f"dictionary-{n_pairs}-{n_bytes}-{seed}.txt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            f.write(dictionary_text(n_pairs, n_bytes, seed))
    return str(path)
