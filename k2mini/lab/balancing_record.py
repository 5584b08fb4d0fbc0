"""The record of notebook 02's runs under other float kernels: the same specs, trained where this
command runs, summarized with the controls the notebook computes (the untrained router on the runs'
last batches, the bias's effect on validation text), written with `k2mini.lab.records.write_record`.

    ATEN_CPU_CAPABILITY=default python -m k2mini.lab.balancing_record --out data/runs/02_balancing_default_kernels.json

The notebook reads it back (`read_balancing_record`) and checks its claims on these runs too, so the
margins it states are measured on two kernel paths, not one.
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd
import torch

from ..balance import METHODS
from ..data import load_corpus, make_dataset
from .experiments import default_jobs, run_sweep
from .records import read_record, write_record
from .routing_study import balancing_base, balancing_spec, bias_effect, summarize_runs, untrained_window_stats

__all__ = ["SPEEDS", "study_specs", "controls", "read_balancing_record", "main"]

SPEEDS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def study_specs(steps: int, seeds, u: float):
    """(sweep specs: seed 0, no balancing and the loss-free rule at every speed; method specs: every
    balancing method at every seed)."""
    base = balancing_base(steps)
    sweep = [balancing_spec(base, "none", seeds[0])] + [
        balancing_spec(base, "loss_free", seeds[0], s).replace(label=f"loss_free u={s:g}") for s in SPEEDS]
    return sweep, [balancing_spec(base, m, s, default_u=u) for s in seeds for m in METHODS]


def controls(runs, data, last: int, val_batches: int = 4) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(untrained: per seed the untrained router's maxvio / dead / starved on the batches of the
    no-balancing run's last `last` steps; effect: per loss-free run and MoE layer, `bias_effect` on
    `val_batches` validation batches)."""
    untrained = pd.DataFrame({r.spec.seed: untrained_window_stats(r.spec, data, last) for r in runs
                              if r.spec.get("balancing") == "none"}).T.rename_axis("seed")  # fmt: skip
    parts = []
    for r in runs:
        if r.spec.get("balancing") == "loss_free":
            batches = list(data.iter_val_batches(r.spec.batch_size, r.spec.seq_len, max_batches=val_batches))
            parts.append(bias_effect(r.model, batches).assign(seed=r.spec.seed).set_index("seed", append=True))
    effect = pd.concat(parts).reorder_levels(["seed", "MoE layer"]).sort_index()
    return untrained, effect


def read_balancing_record(path):
    """(meta, sweep, table, untrained, effect) of a record written by `main`."""

    meta, _, summary = read_record(path)
    sweep = summary[summary["part"] == "sweep"].reset_index(drop=True)
    table = summary[summary["part"] == "methods"].reset_index(drop=True)
    un = summary[summary["part"] == "untrained"]
    untrained = pd.DataFrame({"maxvio": un["maxvio"].to_numpy(), "dead": un["dead"].to_numpy(),
                              "starved": un["starved"].to_numpy()}, index=pd.Index(un["seed"].astype(int), name="seed"))
    ef = summary[summary["part"] == "effect"]
    effect = pd.DataFrame({"changed": ef["changed"].to_numpy(), "maxvio_raw": ef["maxvio_raw"].to_numpy(),
                           "maxvio_routed": ef["maxvio_routed"].to_numpy()},
                          index=pd.MultiIndex.from_arrays([ef["seed"].astype(int), ef["moe_layer"].astype(int)],
                                                          names=["seed", "MoE layer"]))  # fmt: skip
    return meta, sweep, table, untrained, effect


def main(argv=None) -> None:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--u", type=float, default=1e-2)
    p.add_argument("--last", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = make_dataset(load_corpus("shakespeare", progress=False))
    sweep_specs, method_specs = study_specs(args.steps, seeds, args.u)
    # each spec's own corpus (this same Shakespeare), so that one-thread processes can train them
    jobs = default_jobs()
    sweep_runs = run_sweep(sweep_specs, jobs=jobs)
    runs = run_sweep(method_specs, jobs=jobs)
    untrained, effect = controls(runs, data, args.last)
    summary = pd.concat([
        summarize_runs(sweep_runs, last=args.last).assign(part="sweep"),
        summarize_runs(runs, last=args.last).assign(part="methods"),
    ], ignore_index=True)  # fmt: skip
    extra = pd.concat([
        untrained.reset_index().assign(part="untrained"),
        effect.reset_index().rename(columns={"MoE layer": "moe_layer"}).assign(part="effect"),
    ], ignore_index=True)  # fmt: skip
    # the controls ride along as rows of runs they belong to: one row per run is what a record holds
    rows = [*sweep_runs, *runs]
    holders = [next(r for r in runs if r.spec.seed == s and r.spec.get("balancing") == m)
               for s, m in zip(extra["seed"].astype(int), extra["part"].map({"untrained": "none", "effect": "loss_free"}))]
    summary = pd.concat([summary, extra], ignore_index=True)
    kernels = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR") if os.environ.get(k)]
    command = " ".join([*kernels, "python -m k2mini.lab.balancing_record", *(argv if argv is not None else sys.argv[1:])])
    write_record(args.out, rows + holders, summary=summary, command=command, max_points=20,
                 note="notebook 02's runs and controls; rows with part untrained / effect carry the controls")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
