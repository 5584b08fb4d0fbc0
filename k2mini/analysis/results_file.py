"""One JSON file holding an analysis (static summary and/or streaming result) for notebooks to plot.

    save_results("results.json", summary=router_summary(src), stream=stream_activations(src, ids))
    summary, stream = load_results("results.json")

Written atomically (a temporary file beside it, then renamed over it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .result import StreamResult

FORMAT = "k2mini.analysis/1"


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def summary_to_dict(df) -> dict:
    rows = [{"layer": int(layer), **{k: _plain(v) for k, v in row.items()}} for layer, row in df.iterrows()]
    return {"attrs": {k: _plain(v) for k, v in df.attrs.items()}, "rows": rows}


def summary_from_dict(d: dict):
    import pandas as pd

    df = pd.DataFrame(d["rows"]).set_index("layer")
    for col in ("bias_centred", "router_norms", "expert_norms"):
        if col in df:
            df[col] = [np.asarray(v, dtype=float) for v in df[col]]
    df.attrs.update(d.get("attrs", {}))
    return df


def save_results(path, summary=None, stream: StreamResult | None = None, extra: dict | None = None) -> Path:
    """Write the static summary (a router_summary DataFrame) and/or a StreamResult to one JSON file."""
    path = Path(path)
    doc = {
        "format": FORMAT,
        "static": None if summary is None else summary_to_dict(summary),
        "stream": None if stream is None else stream.to_dict(),
        "extra": extra or {},
    }
    with atomic_write(path, "w") as f:
        json.dump(doc, f)
    return path


def load_results(path):
    """(router summary DataFrame or None, StreamResult or None) from a file save_results wrote."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a k2mini analysis results file (format {FORMAT!r} expected)")
    summary = None if doc.get("static") is None else summary_from_dict(doc["static"])
    stream = None if doc.get("stream") is None else StreamResult.from_dict(doc["stream"])
    return summary, stream
