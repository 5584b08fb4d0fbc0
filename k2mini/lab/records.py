"""Records of full-scale runs, committed under `data/runs/`: small JSON files that a notebook at the
ci scale reads back to show what the long runs gave.

    write_record("data/runs/x.json", runs, summary=table, command="K2MINI_SCALE=full ...")
    meta, runs, summary = read_record("data/runs/x.json")

A record holds the command and the machine, and per run its spec, how it ended, a summary row (any
table with one row per run, e.g. `stability.summarize` or `routing_study.summarize_runs`) and its
history thinned to at most `max_points` rows. Not the weights, not the per-step expert loads.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .experiments import RunResult, machine_description, training_code_digest, write_json

__all__ = ["write_record", "read_record", "thin_history", "RECORD_FORMAT"]

RECORD_FORMAT = 2


def thin_history(history, max_points: int = 250, columns: Sequence[str] | None = None):
    """At most `max_points` rows: consecutive chunks of k steps, each summarized by its last step, the
    max of the max-logit columns (so no spike is lost), the mean of the other per-step figures and the
    last value of val_loss, tokens, lr and the running clip share."""
    cols = [c for c in (columns or history.columns) if c in history.columns]
    n = len(history)
    k = max(1, math.ceil(n / max_points))
    if k == 1:
        return history[cols].reset_index(drop=True)
    chunk = np.arange(n) // k
    last = ("step", "tokens", "lr", "qk_clip/frac_heads_ever_clipped", "wall_time")
    agg = {}
    for c in cols:
        if c == "val_loss" or c in last:
            agg[c] = "last"  # groupby's last skips NaN: for val_loss, the chunk's latest evaluation
        elif "max_logit" in c:
            agg[c] = "max"
        else:
            agg[c] = "mean"
    return history[cols].groupby(chunk).agg(agg).reset_index(drop=True)


RECORD_COLUMNS = ("step", "tokens", "lr", "train_loss", "val_loss", "max_logit", "maxvio", "qk_clip/heads_clipped",
                  "qk_clip/frac_heads_ever_clipped", "post_clip_max_logit", "post_clip_max_logit_clipped")


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v.item() if hasattr(v, "item") else v


def write_record(path: str | os.PathLike, results: Sequence[RunResult], *, summary=None, command: str | None = None,
                 note: str = "", max_points: int = 250, columns: Sequence[str] = RECORD_COLUMNS) -> Path:
    """Write the record of `results` (see the module docstring) atomically; `summary` has one row per
    result, in the same order."""
    if summary is not None and len(summary) != len(results):
        raise ValueError(f"write_record: summary has {len(summary)} rows for {len(results)} runs")
    command = command if command is not None else " ".join([Path(sys.executable).name] + sys.argv)
    runs = []
    for i, r in enumerate(results):
        d = r.to_json(history=thin_history(r.history, max_points, columns))
        d["summary"] = {} if summary is None else {k: _plain(v) for k, v in summary.iloc[i].items()}
        runs.append(d)
    record = {"format": RECORD_FORMAT, "command": command, "note": note, "machine": machine_description(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "training_code": training_code_digest(), "runs": runs}
    write_json(Path(path), record)
    return Path(path)


def read_record(path: str | os.PathLike):
    """(metadata, runs, summary) of a record: the runs' histories are the thinned ones, `summary` the
    table given to `write_record` (computed from the full histories)."""
    import json

    import pandas as pd

    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path}: record format {record.get('format')!r}, this code reads {RECORD_FORMAT}")
    runs = [RunResult.from_json(d, from_cache=True) for d in record["runs"]]
    summary = pd.DataFrame([{k: (float("nan") if v is None else v) for k, v in d["summary"].items()}
                            for d in record["runs"]])
    meta = {k: v for k, v in record.items() if k != "runs"}
    return meta, runs, summary
