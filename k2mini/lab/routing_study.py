"""Small studies of routing: one router's decision laid out step by step, grids of training runs
(balancing methods, bias speeds, expert counts), and the summaries and verdicts the notebooks print.

    runs = run_grid(config, data, [{"balancing": m, "seed": s} for m in METHODS for s in (0, 1)],
                    steps=300, lr=3e-3, batch_size=16, seq_len=64)
    table = summarize_runs(runs, last=100)       # one row per run: final val loss, MaxVio, dead experts
    compare(table, "balancing", "val_loss")      # mean, seed spread, and which gaps clear the noise

Every run builds its model from `seed` (a generator, not the global RNG) and draws its batches from
`seed`, so two runs with the same seed see the same tokens in the same order whatever else differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..atomic import atomic_write
from ..config import K2Config
from ..model import K2ForCausalLM
from ..train import TrainConfig, train

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "seed"}

__all__ = [
    "Run",
    "routing_walkthrough",
    "build_model",
    "run_grid",
    "summarize_runs",
    "dead_expert_fraction",
    "window_load",
    "compare",
    "t_critical",
    "sparsity_configs",
    "param_table",
    "sparsity_settings",
    "sparsity_study",
    "save_record",
    "load_record",
    "machine_info",
]


def routing_walkthrough(scores: torch.Tensor, gate, tokens: Sequence[str] | None = None, *,
                        expected: tuple[torch.Tensor, torch.Tensor] | None = None, decimals: int = 3) -> pd.DataFrame:  # fmt: skip
    """K2's routing (K2_SPEC section 4) redone stage by stage from the sigmoid scores, one row per token.

    scores: (N, E) sigmoid scores (e.g. a RouterRecord's `scores[b, :N]`); gate: the layer's `Router`
    (its correction bias, top_k, normalization and scaling factor; n_group must be 1). Columns: the
    top-k by raw score, the top-k of score + bias (the experts chosen), whether the bias changed the
    choice, the chosen experts' raw scores, the weights after normalization and after the scaling
    factor. expected: the (indices (N, k), weights (N, k)) the model produced; the rebuilt choice and
    weights must match them (as sets of (expert, weight) pairs), else AssertionError.
    """
    if gate.n_group != 1:
        raise ValueError("routing_walkthrough covers n_group = 1 (K2); grouped routing restricts the top-k")
    with torch.no_grad():
        s = scores.detach().to(torch.float32)  # (N, E), unbiased
        k = gate.top_k
        raw_top = s.topk(k, dim=-1).indices  # what the router would pick without the bias
        chosen = (s + gate.e_score_correction_bias).topk(k, dim=-1).indices  # the bias picks experts...
        w = s.gather(1, chosen)  # ...but the weights come from the unbiased scores
        w_norm = w / (w.sum(-1, keepdim=True) + 1e-20) if gate.norm_topk_prob else w
        w_final = w_norm * gate.routed_scaling_factor
        if expected is not None:
            idx, wt = (t.reshape(len(s), k) for t in expected)
            mine, theirs = chosen.sort(-1), idx.sort(-1)
            if not torch.equal(mine.values, theirs.values) or not torch.allclose(
                w_final.gather(1, mine.indices), wt.to(torch.float32).gather(1, theirs.indices), atol=1e-5
            ):
                raise AssertionError("routing_walkthrough: rebuilt routing differs from the model's")
    changed = [set(a) != set(b) for a, b in zip(raw_top.tolist(), chosen.tolist())]
    fmt = lambda row: " ".join(f"{v:.{decimals}f}" for v in row)  # noqa: E731
    return pd.DataFrame({
        "token": list(tokens) if tokens is not None else list(range(len(s))),
        "top-k of s": [list(map(int, row)) for row in raw_top],
        "top-k of s + b (chosen)": [list(map(int, row)) for row in chosen],
        "bias changed it": changed,
        "s of chosen": [fmt(row) for row in w.tolist()],
        "normalized": [fmt(row) for row in w_norm.tolist()],
        f"x {gate.routed_scaling_factor:g} (weights)": [fmt(row) for row in w_final.tolist()],
    })  # fmt: skip


def build_model(config: K2Config, seed: int) -> K2ForCausalLM:
    """A freshly initialized model whose weights depend only on (config, seed)."""
    model = K2ForCausalLM(config)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


@dataclass
class Run:
    """One training run of a grid: its settings, its train() history, its CPU seconds and, when the
    grid was run with keep_models=True, the trained model."""

    params: dict
    history: pd.DataFrame
    config: K2Config
    cpu_s: float = 0.0
    model: K2ForCausalLM | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


def run_grid(
    config: K2Config,
    data,
    grid: Iterable[dict],
    *,
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    progress: bool = False,
    keep_models: bool = False,
    **train_kwargs,
) -> list[Run]:
    """Train one fresh model per entry of `grid` and return the runs in order.

    Each entry may set `seed` (model init and batch order, default 0), `config` (a K2Config or a dict
    of K2Config.replace changes) and any TrainConfig field (`balancing`, `bias_update_speed`, ...);
    the rest comes from the common keywords. Other keys are labels: kept in Run.params, not passed on.
    The optimizer is AdamW (betas 0.9, 0.95).
    keep_models: keep each trained model (in eval mode) on its Run.
    """
    runs = []
    for params in grid:
        params = dict(params)
        settings = {**train_kwargs, **{k: v for k, v in params.items() if k in _TRAIN_FIELDS}}
        cfg = params.get("config", config)
        if isinstance(cfg, dict):
            cfg = config.replace(**cfg)
            params["config"] = ", ".join(f"{k}={v}" for k, v in params["config"].items())
        elif isinstance(cfg, K2Config):
            params.pop("config", None)
        seed = int(params.get("seed", 0))
        model = build_model(cfg, seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        t0 = time.process_time()
        history = train(model, data, opt, steps, seed=seed, progress=progress, **settings)
        cpu_s = time.process_time() - t0
        runs.append(Run(params=params, history=history, config=cfg, cpu_s=cpu_s, model=model.eval() if keep_models else None))
    return runs


def window_load(history: pd.DataFrame, last: int) -> np.ndarray:
    """Token-slots per (MoE layer, expert) summed over the last `last` logged steps: (n_layers, E)."""
    return np.stack(history["load"].iloc[-last:].to_numpy()).sum(0)


def dead_expert_fraction(load: np.ndarray, threshold: float = 0.0) -> float:
    """Share of (layer, expert) pairs with no token (threshold 0) or, with a threshold, under
    `threshold` x the layer's mean load. load: (n_layers, E) token-slot counts, e.g. from window_load."""
    load = np.asarray(load, dtype=float)
    if threshold == 0:
        return float((load == 0).mean())
    return float((load < threshold * load.mean(-1, keepdims=True)).mean())


def summarize_runs(runs: Sequence[Run], last: int = 50, starved_below: float = 0.1) -> pd.DataFrame:
    """One row per run: its grid parameters, then
    val_loss (final evaluation), train_loss (mean of the last `last` steps), maxvio (mean MaxVio over
    the last `last` steps, layers averaged), maxvio_all (the same over the whole run),
    maxvio_max_layer (the worst layer's over the last steps), dead (share of
    experts that received no token in those steps), starved (share with under `starved_below` x the
    uniform load), aux_loss (mean, last steps), cpu_s, and total/active parameters."""
    rows = []
    for r in runs:
        h = r.history
        tail = h.iloc[-last:]
        vio_cols = [c for c in h.columns if c.startswith("maxvio_l")]
        counts = r.config.param_counts()
        rows.append({
            **r.params,
            "val_loss": float(h["val_loss"].dropna().iloc[-1]),
            "train_loss": float(tail["train_loss"].mean()),
            "maxvio": float(tail["maxvio"].mean()),
            "maxvio_all": float(h["maxvio"].mean()),
            "maxvio_max_layer": float(tail[vio_cols].mean().max()) if vio_cols else float("nan"),
            "dead": dead_expert_fraction(window_load(h, last)),
            "starved": dead_expert_fraction(window_load(h, last), starved_below),
            "aux_loss": float(tail["aux_loss"].mean()),
            "cpu_s": r.cpu_s,
            "total_params": counts["total"],
            "active_params": counts["active"],
        })  # fmt: skip
    return pd.DataFrame(rows)


# two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_critical(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (a two-sided 5% test)."""
    if df < 1:
        raise ValueError(f"t_critical: df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def compare(table: pd.DataFrame, by: str, metric: str, *, baseline=None, seed: str = "seed") -> pd.DataFrame:
    """Per value of `by`: mean, min and max of `metric` over seeds, the gap to `baseline` (default: the
    first value) and two tests of whether that gap is more than run-to-run noise.

    separated (paired t-test, two-sided 5%): seeds are paired (same seed = same batches and, for equal
        shapes, the same initialization); with the per-seed gaps d_s = metric(value, s) -
        metric(baseline, s), True when |mean d| > t_{0.975, n-1} * std(d) / sqrt(n). Needs 2 seeds.
    apart (unpaired): the ranges over seeds do not overlap, every run of one is below every run of the
        other. With 3 seeds against 3 that happens by chance 1 time in 10, with 5 against 5, 1 in 126.
    `t` is |mean d| / (std(d) / sqrt(n)), the statistic of the paired test.
    """
    values = list(dict.fromkeys(table[by]))
    baseline = values[0] if baseline is None else baseline
    wide = table.pivot_table(index=seed, columns=by, values=metric, aggfunc="mean")[values]
    base = wide[baseline].dropna()
    rows = []
    for v in values:
        d = (wide[v] - wide[baseline]).dropna().to_numpy()
        n = len(d)
        gap = float(d.mean()) if n else float("nan")
        se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        t = abs(gap) / se if se > 0 else (float("inf") if n > 1 and gap else float("nan"))
        runs = wide[v].dropna()
        apart = v != baseline and len(runs) > 1 and (runs.max() < base.min() or runs.min() > base.max())
        rows.append({
            by: v,
            "mean": float(wide[v].mean()),
            "min": float(wide[v].min()),
            "max": float(wide[v].max()),
            f"gap to {baseline}": gap,
            "t": t,
            "separated": bool(v != baseline and n > 1 and t > t_critical(n - 1)),
            "apart": bool(apart),
        })  # fmt: skip
    return pd.DataFrame(rows).set_index(by)


def sparsity_configs(base: K2Config, n_experts: Sequence[int], top_k: int | None = None) -> dict[int, K2Config]:
    """{E: config} with E routed experts and everything else of `base` (top-k, expert width, shared
    experts, attention) unchanged, so the active parameters stay fixed while the total grows."""
    top_k = base.num_experts_per_tok if top_k is None else top_k
    return {E: base.replace(n_routed_experts=E, num_experts_per_tok=top_k) for E in n_experts}


def param_table(configs: dict[int, K2Config]) -> pd.DataFrame:
    """Total and active parameters per configuration, with the active ones split into routed experts,
    router (grows with E: one row of the gate per expert) and the rest."""
    rows = []
    for E, c in configs.items():
        b = c.param_breakdown()
        total, active = sum(b["total"].values()), sum(b["active"].values())
        rows.append({
            "n_experts": E,
            "top_k": c.num_experts_per_tok,
            "sparsity": c.sparsity,
            "total": total,
            "active": active,
            "active routed experts": b["active"]["routed_experts"],
            "router": b["active"]["router"],
            "active without router": active - b["active"]["router"],
        })  # fmt: skip
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Records of long runs (data/runs/*.json) and the command that makes them


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a record needs to say about where it was computed."""
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def save_record(path: str | os.PathLike, runs: Sequence[Run], *, command: str, settings: dict, last: int = 50) -> None:
    """Write the runs' summaries and validation curves (not the models or per-step loads) as JSON."""
    table = summarize_runs(runs, last=last)
    record = {
        "command": command,
        "machine": machine_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "summary": table.to_dict(orient="records"),
        "val_curves": [
            {"params": r.params, "step": h["step"].tolist(), "val_loss": h["val_loss"].tolist()}
            for r in runs
            for h in [r.history.dropna(subset=["val_loss"])]
        ],
    }
    with atomic_write(path, "w") as f:
        f.write(json.dumps(record, indent=1, default=float) + "\n")


def load_record(path: str | os.PathLike) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(record without its tables, summary table, long table of validation curves) from save_record."""
    record = json.loads(Path(path).read_text())
    summary = pd.DataFrame(record.pop("summary"))
    curves = pd.DataFrame([
        {**c["params"], "step": s, "val_loss": v} for c in record.pop("val_curves") for s, v in zip(c["step"], c["val_loss"])
    ])  # fmt: skip
    return record, summary, curves


def _sparsity_job(args):
    settings, E, seed = args
    torch.set_num_threads(1)
    from ..data import load_corpus, make_dataset

    data = make_dataset(load_corpus(settings["corpus"]))
    base = K2Config.preset(settings["preset"]).replace(**settings["model"])
    cfg = sparsity_configs(base, [E])[E]
    (run,) = run_grid(cfg, data, [{"config": cfg, "n_experts": E, "sparsity": cfg.sparsity, "seed": seed}], **settings["train"])
    return run


def sparsity_study(settings: dict, jobs: int = 1) -> list[Run]:
    """Train every (n_experts, seed) of `settings` (see `main`), in `jobs` processes."""
    tasks = [(settings, E, s) for s in settings["seeds"] for E in settings["n_experts"]]
    if jobs <= 1:
        return [_sparsity_job(t) for t in tasks]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_sparsity_job, tasks, chunksize=1)


def main(argv: Sequence[str] | None = None) -> int:
    """python -m k2mini.lab.routing_study sparsity --steps 1500 --seeds 0,1,2 --jobs 3 --out data/runs/x.json"""
    import argparse
    import shlex
    import sys

    p = argparse.ArgumentParser(prog="python -m k2mini.lab.routing_study", description="routing studies that take a while")
    sub = p.add_subparsers(dest="study", required=True)
    s = sub.add_parser("sparsity", help="validation loss against total experts at fixed active experts")
    s.add_argument("--preset", default="k2-micro")
    s.add_argument("--layers", type=int, default=3)
    s.add_argument("--top-k", type=int, default=4)
    s.add_argument("--moe-width", type=int, default=16, help="moe_intermediate_size")
    s.add_argument("--experts", default="8,16,32,64")
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--lr", type=float, default=5e-3)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--seq", type=int, default=64)
    s.add_argument("--speed", type=float, default=3e-3, help="bias update speed u (loss_free)")
    s.add_argument("--eval-every", type=int, default=250)
    s.add_argument("--corpus", default="shakespeare")
    s.add_argument("--jobs", type=int, default=1)
    s.add_argument("--out", required=True)
    a = p.parse_args(argv)
    settings = sparsity_settings(
        preset=a.preset, layers=a.layers, top_k=a.top_k, moe_width=a.moe_width,
        n_experts=[int(e) for e in a.experts.split(",")], seeds=[int(x) for x in a.seeds.split(",")],
        steps=a.steps, lr=a.lr, batch=a.batch, seq=a.seq, speed=a.speed, eval_every=a.eval_every, corpus=a.corpus,
    )  # fmt: skip
    torch.set_num_threads(1)  # as every worker does, so the record's machine info says what the runs used
    t0 = time.time()
    runs = sparsity_study(settings, a.jobs)
    command = "python -m k2mini.lab.routing_study " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    save_record(a.out, runs, command=command, settings={**settings, "wall_s": round(time.time() - t0)})
    print(summarize_runs(runs)[["n_experts", "seed", "val_loss", "maxvio", "cpu_s"]].to_string(index=False))
    return 0


def sparsity_settings(*, preset="k2-micro", layers=3, top_k=4, moe_width=16, n_experts=(8, 16, 32, 64), seeds=(0, 1, 2),
                      steps=1500, lr=5e-3, batch=16, seq=64, speed=3e-3, eval_every=250, corpus="shakespeare") -> dict:  # fmt: skip
    """The settings of a sparsity study, as `sparsity_study` and `save_record` take them."""
    return {
        "preset": preset,
        "model": {"num_hidden_layers": layers, "num_experts_per_tok": top_k, "moe_intermediate_size": moe_width},
        "n_experts": list(n_experts),
        "seeds": list(seeds),
        "corpus": corpus,
        "train": {
            "steps": steps, "lr": lr, "batch_size": batch, "seq_len": seq, "balancing": "loss_free",
            "bias_update_speed": speed, "schedule": "cosine", "warmup_steps": 20, "eval_every": eval_every,
            "eval_batches": 16,
        },  # fmt: skip
    }


if __name__ == "__main__":
    raise SystemExit(main())
