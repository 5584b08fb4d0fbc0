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
    "languages_text",
    "languages_corpus",
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


LANGUAGES_VERSION = 1  # part of the file name: a change to `languages_text` writes a new corpus


def languages_text(n_languages: int = 48, n_bytes: int = 2_000_000, *, alphabet: int = 32, letters: int = 12,
                   successors: int = 2, doc_len: int = 256, seed: int = 0) -> str:
    """A corpus where what there is to know outgrows a small model: `n_languages` random "languages",
    one per line of `doc_len` bytes.

    Each language writes with its own `letters` of an `alphabet` of symbols (a-z, A-F), and after each
    of its letters it allows only `successors` others (drawn at random once, per language): a sparse
    bigram table. A line picks a language at random and walks its table uniformly. Knowing a line's
    language and its last byte leaves log(`successors`) nats per byte; a model must hold every
    language's table (n_languages x letters x successors entries) and tell the language from the
    line so far. The tables are fixed by `seed`; the same call gives the same text."""
    if not 2 <= letters <= alphabet <= 32 or not 1 <= successors <= letters:
        raise ValueError(f"languages_text: need 2 <= letters ({letters}) <= alphabet ({alphabet}) <= 32 and "
                         f"1 <= successors ({successors}) <= letters")
    rng = np.random.default_rng(seed)
    symbols = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEF"[:alphabet], dtype=np.uint8)
    uses = np.stack([rng.choice(alphabet, letters, replace=False) for _ in range(n_languages)])  # (L, letters)
    table = np.stack([np.stack([rng.choice(letters, successors, replace=False) for _ in range(letters)])
                      for _ in range(n_languages)])  # (L, letters, successors): indices into the language's letters
    n_docs = -(-n_bytes // doc_len)
    lang = rng.integers(0, n_languages, n_docs)
    pick = rng.integers(0, successors, (n_docs, doc_len - 2))
    walk = np.empty((n_docs, doc_len - 1), dtype=np.int64)  # positions in the language's letters
    walk[:, 0] = rng.integers(0, letters, n_docs)
    for t in range(doc_len - 2):
        walk[:, t + 1] = table[lang, walk[:, t], pick[:, t]]
    lines = np.empty((n_docs, doc_len), dtype=np.uint8)
    lines[:, :-1] = symbols[uses[lang[:, None], walk]]
    lines[:, -1] = ord("\n")
    return lines.tobytes()[:n_bytes].decode("ascii")


def languages_corpus(n_languages: int = 48, n_bytes: int = 2_000_000, seed: int = 0, root=None, **shape) -> str:
    """The path (a string, for `RunSpec.corpus`) of `languages_text(n_languages, n_bytes, seed=seed, **shape)`,
    written once under `<data root>/synthetic/` (atomically: two notebooks may ask at once) and reused."""
    folder = (default_data_root() if root is None else Path(root)) / "synthetic"
    extra = "".join(f"-{k}{v}" for k, v in sorted(shape.items()))
    path = folder / f"languages-v{LANGUAGES_VERSION}-L{n_languages}-{n_bytes}-seed{seed}{extra}.txt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            f.write(languages_text(n_languages, n_bytes, seed=seed, **shape))
    return str(path)
