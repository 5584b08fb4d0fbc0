"""How far each checked claim of notebooks 04, 05 and 06 holds on other seeds and float kernels.

A notebook checks its claims on one seed under the kernels of the machine that runs it; this module
re-runs the notebook's own study for another seed (and, run under ``ATEN_CPU_CAPABILITY=default`` or
``MKL_CBWR=COMPATIBLE``, other kernels), evaluates the same claim functions and writes one row per
claim: whether it held and its margin. The rows of all (kernel, seed) pairs are merged into a
committed record that the notebook prints, so the spread it quotes is one it shows.

    K2MINI_RUN_CACHE=cache-default ATEN_CPU_CAPABILITY=default \\
        python -m k2mini.lab.margins 04 --seed 1 --out part-04-default-1.json
    python -m k2mini.lab.margins merge data/runs/04_claim_margins.json part-04-*.json

Use one run cache per kernel path: the cache reuses a run whatever kernels made it. The runs train in
one-thread processes, one per core (``$K2MINI_JOBS`` sets how many: ``experiments.default_jobs``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["study_04", "study_05", "specs_05", "study_06", "verdicts_04", "verdicts_05", "verdicts_06", "read_margins",
           "MARGIN_FORMAT"]

MARGIN_FORMAT = 1

# notebook 04's ci parameters (its parameters cell)
NB04 = dict(preset="k2-micro", steps=150, lrs=[1e-2, 3e-2, 1e-1], tau=30.0, tau_k2=100.0, weight_decay=0.1,
            batch_size=8, seq_len=128)
# notebook 05's section 2 (its claims are over a set of seeds: a "seed" s here is the set s, s + 1, s + 2)
NB05 = dict(experts=[8, 16, 32, 64], control=8, languages=48, few=4, steps=400, n_seeds=3, lr=5e-3, batch_size=16,
            seq_len=64, u=1e-2, model={"num_hidden_layers": 1, "first_k_dense_replace": 0, "num_experts_per_tok": 4,
                                       "moe_intermediate_size": 16})
# notebook 06's: notebook 02's comparison runs (ci) and the degree the dispatch claim is checked at
NB06 = dict(last=50, degree=4)


def study_04(seed: int, progress: bool = False, jobs: int = 1):
    """Notebook 04's ci sweep, long run and its constant-lr control for `seed`: (table, runs, long, constant);
    `jobs` one-thread processes train them (run_sweep's jobs)."""
    from .experiments import run_sweep
    from .stability import long_specs, summarize, sweep_specs

    specs = sweep_specs(seed=seed, **NB04)
    runs = run_sweep(specs, progress=progress, jobs=jobs)
    clip_top = next(s for s in specs if s.optimizer == "muonclip" and s.tau == NB04["tau"] and s.lr == NB04["lrs"][-1])
    long, constant = run_sweep(list(long_specs(clip_top)), progress=progress, jobs=jobs)
    return summarize(runs), runs, long, constant


def verdicts_04(table, runs, long, constant) -> dict:
    """Every checked claim of notebook 04 on one sweep, by name."""
    from .claims import stability as c
    from .stability import best_runs, clips_per_part

    top, tau = NB04["lrs"][-1], NB04["tau"]
    best = {r.spec.optimizer: r for r in best_runs(runs)}
    return {
        "clip_caps_fresh_logits": c.clip_caps_fresh_logits(table, lr=top, tau=tau),
        "clip_cuts_peak_cheaply": c.clip_cuts_peak_cheaply(table, lr=top, tau=tau),
        "clip_fades_as_lr_decays": c.clip_fades_as_lr_decays(clips_per_part(long.history, long.spec.steps),
                                                             clips_per_part(constant.history, constant.spec.steps)),
        "adamw_logits_exceed_muon": c.adamw_logits_exceed_muon(table),
        "muon_beats_adamw": c.muon_beats_adamw(best["muon"], best["adamw"]),
    }


def study_05(seed: int, progress: bool = False, jobs: int = 1):
    """Notebook 05's ci sweep for the seeds `seed`, `seed` + 1, `seed` + 2: (runs on 48 languages with the
    same-E control, runs of E = 8 and 64 on 4 languages)."""
    from .experiments import run_sweep

    specs, few = specs_05(seed)
    runs = run_sweep(specs + few, progress=progress, jobs=jobs)
    return runs[:len(specs)], runs[len(specs):]


def specs_05(seed: int):
    """The RunSpecs of notebook 05's ci sweep for the seeds `seed` .. `seed` + 2: (48 languages with the
    same-E control, E = 8 and 64 on 4 languages)."""
    from .experiments import RunSpec
    from .sparsity_study import languages_corpus, paired_specs

    n = NB05
    seeds = list(range(seed, seed + n["n_seeds"]))
    base = RunSpec(preset="k2-micro", config=n["model"], optimizer="adamw", lr=n["lr"], steps=n["steps"],
                   batch_size=n["batch_size"], seq_len=n["seq_len"], eval_every=n["steps"] // 4, eval_batches=16,
                   corpus=languages_corpus(n["languages"]),
                   train={"balancing": "loss_free", "bias_update_speed": n["u"], "schedule": "cosine", "warmup_steps": 20})
    specs = paired_specs(base, n["experts"], seeds, control=n["control"])
    few = paired_specs(base.replace(corpus=languages_corpus(n["few"])), [min(n["experts"]), max(n["experts"])], seeds)
    return specs, few


def verdicts_05(runs, few_runs) -> dict:
    """Notebook 05's checked claims on one set of seeds, and the control that must fail (4 languages)."""
    from .claims import sparsity as c
    from .sparsity_study import compute_to_match, paired_gaps, val_curves

    E8, E64, control = min(NB05["experts"]), max(NB05["experts"]), f"{NB05['control']}'"
    curves, few_curves = val_curves(runs), val_curves(few_runs)
    last = NB05["steps"]
    gaps, noise = paired_gaps(curves, E64, E8)[last], paired_gaps(curves, control, E8)[last]
    few = paired_gaps(few_curves, E64, E8)[last]
    return {
        "more_experts_ahead": c.more_experts_ahead(gaps, noise),
        "less_compute_for_the_same_loss": c.less_compute_for_the_same_loss(compute_to_match(curves, baseline=E8), E64,
                                                                           control=control),
        "lead_grows_with_what_there_is_to_know": c.lead_grows_with_what_there_is_to_know(gaps, few, noise),
        "more_experts_ahead on 4 languages (control)": c.more_experts_ahead(few, noise),
    }


def study_06(seeds, progress: bool = False, jobs: int = 1):
    """Notebook 02's comparison runs (ci scale) for `seeds`, as notebook 06 runs them: a list of RunResults."""
    from ..balance import METHODS
    from .experiments import run_sweep
    from .expert_parallel import balancing_specs

    return run_sweep([s for seed in seeds for s in balancing_specs(seed, METHODS)], progress=progress, jobs=jobs)


def verdicts_06(runs) -> dict:
    """Notebook 06's checked claim on the runs of one or more seeds, and (not claimed) loss-free against aux loss."""
    from .claims import dispatch as c
    from .expert_parallel import straggler_table

    table = straggler_table(runs, degrees=[NB06["degree"]], last=NB06["last"])
    return {"balancing_cuts_stragglers": c.balancing_cuts_stragglers(table, degree=NB06["degree"]),
            "loss_free_below_aux_loss (not claimed)": c.balancing_cuts_stragglers(
                table, degree=NB06["degree"], methods=("loss_free",), baseline="aux_loss", by=0.0)}


def _kernels() -> str:
    parts = [os.environ.get("ATEN_CPU_CAPABILITY") or "native"]
    if os.environ.get("MKL_CBWR"):
        parts.append(f"MKL_CBWR={os.environ['MKL_CBWR']}")
    return " ".join(parts)


def _rows(notebook: str, seed: int, verdicts: dict) -> list[dict]:
    return [{"notebook": notebook, "kernels": _kernels(), "seed": seed, "claim": name, "holds": bool(v.holds),
             "margin": float(v.margin), "detail": v.detail} for name, v in verdicts.items()]


def read_margins(path):
    """(metadata, table) of a merged margins record: one row per (kernels, seed, claim)."""
    import pandas as pd

    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != MARGIN_FORMAT:
        raise ValueError(f"{path}: margins record format {record.get('format')!r}, this code reads {MARGIN_FORMAT}")
    return {k: v for k, v in record.items() if k != "rows"}, pd.DataFrame(record["rows"])


def _write(path: Path, obj) -> None:
    from .experiments import write_json

    write_json(Path(path), obj)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m k2mini.lab.margins", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["04", "05", "06", "merge"])
    p.add_argument("paths", nargs="*", help="merge: the output record, then the parts")
    p.add_argument("--seed", type=int, action="append", help="seed (repeatable; 05: the first of 3 seeds; 06 runs all its seeds together)")
    p.add_argument("--out", help="where the part goes (JSON)")
    args = p.parse_args(argv)
    if args.what == "merge":
        out, parts = args.paths[0], args.paths[1:]
        rows, commands = [], []
        for part in parts:
            with open(part, encoding="utf-8") as f:
                d = json.load(f)
            rows += d["rows"]
            commands.append(d["command"])
        from .experiments import machine_description

        _write(Path(out), {"format": MARGIN_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "machine": machine_description(), "commands": commands, "rows": rows})
        return 0
    import torch

    from .experiments import default_jobs

    torch.set_num_threads(1)
    jobs = default_jobs()  # one-thread processes: the same numbers as one process
    seeds = args.seed or [0]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR") if os.environ.get(k))
    words = [Path(w).name if w == args.out else w for w in (sys.argv[1:] if argv is None else argv)]  # no machine paths
    command = f"{env + ' ' if env else ''}python -m k2mini.lab.margins {' '.join(words)}"
    rows = []
    for seed in seeds:  # the part is rewritten after every seed, so a long study can be stopped early
        if args.what == "04":
            new = _rows("04", seed, verdicts_04(*study_04(seed, jobs=jobs)))
        elif args.what == "05":
            new = _rows("05", seed, verdicts_05(*study_05(seed, jobs=jobs)))
        else:
            new = _rows("06", seed, verdicts_06(study_06([seed], jobs=jobs)))
        rows += new
        _write(Path(args.out), {"command": command, "rows": rows})
        for r in new:
            print(f"{r['kernels']:>10s} seed {r['seed']}  {r['claim']:44s} {'holds' if r['holds'] else 'FAILS'}  "
                  f"margin {r['margin']:+.3f}  {r['detail']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
