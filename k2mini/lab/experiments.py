"""Sweeps of training runs: one spec per run, prepared batches shared, finished runs cached on disk.

    specs = [RunSpec(optimizer=k, lr=lr, steps=300) for k in ("adamw", "muon", "muonclip") for lr in lrs]
    runs = run_sweep(specs)                  # a list of RunResult, in the order of `specs`
    table = summarize(runs)                  # one row per run: peak max logit, final val loss, diverged
    write_record("data/runs/x.json", runs)   # a small, committed record: summaries + thinned histories

A `RunSpec` is everything that decides a run's numbers (model preset and overrides, optimizer,
learning rate, weight decay, tau, steps, batch shape, seeds, corpus, loop settings). Its `key()` hashes
those settings together with the k2mini version and a digest of the library's sources, so a cached run
is reused only by the code that produced it. Cache files are written atomically (a temporary file in
the same folder, then `os.replace`): a reader sees a whole entry or none.

MuonClip runs also record what QK-Clip achieved: after every step that clipped a head, the runner
re-runs the forward pass on that step's batch with the updated, clipped weights and stores the largest
max logit it finds (`post_clip_max_logit`, and `post_clip_max_logit_clipped` over the clipped heads
only). train() records `max_logit` BEFORE the step, so this is the honest test of "the clip holds".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..atomic import atomic_write

__all__ = [
    "RunSpec",
    "RunResult",
    "RunCache",
    "PreparedBatches",
    "run_sweep",
    "run_one",
    "summarize",
    "library_digest",
    "machine_description",
    "write_record",
    "read_record",
    "thin_history",
    "best_runs",
    "optimizer_group",
    "tokens_to_reach",
    "format_summary",
    "significant",
    "default_cache_dir",
    "CLIP_COLUMNS",
]

CLIP_COLUMNS = ("post_clip_max_logit", "post_clip_max_logit_clipped")
_PACKAGE_DIR = Path(__file__).resolve().parent
_FORMAT = 1  # bump when the cache entry layout changes


def default_cache_dir() -> Path:
    """``$K2MINI_RUN_CACHE`` if set, else ``<data root>/runs/cache`` (``data/runs/cache`` in a checkout)."""
    if os.environ.get("K2MINI_RUN_CACHE"):
        return Path(os.environ["K2MINI_RUN_CACHE"])
    from ..data import default_data_root

    return default_data_root() / "runs" / "cache"


@lru_cache(maxsize=1)
def library_digest() -> str:
    """SHA-256 (first 16 hex digits) of every k2mini source file: any edit invalidates cached runs."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        h.update(path.relative_to(_PACKAGE_DIR).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("k2mini")
    except Exception:  # running from a tree that is not installed
        return "unknown"


def machine_description() -> dict:
    """Where numbers came from: host, CPU, core count, torch and Python versions, accelerator if any."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------------------------
# What a run is


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a training run's numbers.

    `config` holds K2Config overrides on top of `preset` (e.g. ``{"num_attention_heads": 2}``), as a
    dict or a tuple of pairs; `train` holds extra train() settings (``schedule``, ``warmup_steps``,
    ``grad_clip``, ``balancing``, ...). `label` names the run in plots and tables and is NOT part of
    the key (two specs that differ only in label share a cache entry).
    """

    optimizer: str = "adamw"  # "adamw" | "muon" | "muonclip" (k2mini.optim.build_optimizer's kind)
    lr: float = 3e-3
    steps: int = 100
    weight_decay: float = 0.1
    tau: float = 100.0  # only used by muonclip
    preset: str = "k2-micro"
    config: Any = ()
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0  # model initialization
    data_seed: int = 0  # batch order (train()'s seed)
    corpus: str = "shakespeare"
    eval_every: int = 50
    eval_batches: int = 4
    train: Any = ()
    label: str = field(default="", compare=False)

    def __post_init__(self):
        # dicts are unhashable: store overrides as sorted tuples of pairs, nested dicts frozen too
        object.__setattr__(self, "config", _freeze(self.config))
        object.__setattr__(self, "train", _freeze(self.train))
        from ..optim import KINDS

        if self.optimizer not in KINDS:
            raise ValueError(f"RunSpec.optimizer must be one of {KINDS}, got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"RunSpec.lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"RunSpec.steps must be a positive int, got {self.steps!r}")

    # -- derived
    @property
    def config_overrides(self) -> dict:
        return _thaw(self.config)

    @property
    def train_settings(self) -> dict:
        return _thaw(self.train)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        tau = f" tau={self.tau:g}" if self.optimizer == "muonclip" else ""
        return f"{self.optimizer}{tau} lr={self.lr:g}"

    def settings(self) -> dict:
        """The settings that decide the numbers, as plain JSON-able data (no label)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "label"}
        d["config"] = self.config_overrides
        d["train"] = self.train_settings
        if self.optimizer != "muonclip":
            d["tau"] = None  # tau does not change an adamw or muon run
        return d

    def key(self) -> str:
        """Hash of settings + k2mini version + library source digest (24 hex digits)."""
        payload = {"settings": self.settings(), "version": _library_version(), "digest": library_digest(),
                   "format": _FORMAT}
        blob = json.dumps(payload, sort_keys=True, default=_json_default).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def model_config(self):
        from ..config import K2Config

        return K2Config.preset(self.preset).replace(**self.config_overrides)

    def replace(self, **changes) -> "RunSpec":
        return dataclasses.replace(self, **changes)


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("__list__",) + tuple(_freeze(v) for v in value)
    if isinstance(value, tuple) and value and value[0] == "__list__":
        return value
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
        return tuple(sorted((k, _freeze(v)) for k, v in value))
    return value


def _thaw(value):
    if isinstance(value, tuple) and value and value[0] == "__list__":
        return [_thaw(v) for v in value[1:]]
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
        return {k: _thaw(v) for k, v in value}
    return value


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


@dataclass
class RunResult:
    """A finished run: its spec, history (a DataFrame, one row per step) and how it ended."""

    spec: RunSpec
    history: Any  # pandas.DataFrame
    diverged: bool
    stop_reason: str
    total_heads: int
    wall_s: float
    machine: dict = field(default_factory=dict)
    from_cache: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def final_val_loss(self) -> float:
        """The last validation loss (NaN when the run diverged before its last evaluation)."""
        if self.diverged or "val_loss" not in self.history:
            return float("nan")
        v = self.history["val_loss"].dropna()
        return float(v.iloc[-1]) if len(v) else float("nan")

    def peak_max_logit(self) -> float:
        ml = self.history["max_logit"].dropna()
        ml = ml[ml.map(math.isfinite)]
        return float(ml.max()) if len(ml) else float("nan")

    def to_json(self) -> dict:
        return {
            "format": _FORMAT,
            "key": self.spec.key(),
            "spec": self.spec.settings(),
            "label": self.spec.label,
            "k2mini_version": _library_version(),
            "library_digest": library_digest(),
            "diverged": self.diverged,
            "stop_reason": self.stop_reason,
            "total_heads": self.total_heads,
            "wall_s": self.wall_s,
            "machine": self.machine,
            "history": _frame_to_columns(self.history),
        }

    @classmethod
    def from_json(cls, d: dict, from_cache: bool = False) -> "RunResult":
        spec = RunSpec(**{**d["spec"], "tau": d["spec"]["tau"] if d["spec"]["tau"] is not None else 100.0,
                          "label": d.get("label", "")})
        return cls(spec=spec, history=_columns_to_frame(d["history"]), diverged=bool(d["diverged"]),
                   stop_reason=d["stop_reason"], total_heads=int(d["total_heads"]), wall_s=float(d["wall_s"]),
                   machine=d.get("machine", {}), from_cache=from_cache)


def _frame_to_columns(df) -> dict:
    out = {}
    for col in df.columns:
        if col == "load":  # per-expert loads: large, and not what these experiments look at
            continue
        values = df[col].tolist()
        out[col] = [None if (isinstance(v, float) and not math.isfinite(v)) else v for v in values]
    return out


def _columns_to_frame(cols: dict):
    import pandas as pd

    frame = {}
    for k, v in cols.items():
        frame[k] = pd.to_numeric(pd.Series([float("nan") if x is None else x for x in v], dtype="float64"))
    df = pd.DataFrame(frame)
    if "step" in df:
        df["step"] = df["step"].astype("int64")
    if "tokens" in df:
        df["tokens"] = df["tokens"].astype("int64")
    return df


# ----------------------------------------------------------------------------------------------
# The on-disk cache


class RunCache:
    """Finished runs as one JSON file each, named by `RunSpec.key()`; writes are atomic."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, spec: RunSpec) -> Path:
        return self.directory / f"{spec.key()}.json"

    def get(self, spec: RunSpec) -> RunResult | None:
        path = self.path(spec)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{path}: unreadable cache entry, ignoring it (it will be recomputed)", stacklevel=2)
            return None
        if d.get("key") != spec.key():
            return None
        result = RunResult.from_json(d, from_cache=True)
        result.spec = spec  # keep the caller's label
        return result

    def put(self, result: RunResult) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(result.spec)
        _write_json_atomic(path, result.to_json())
        return path

    def __contains__(self, spec: RunSpec) -> bool:
        return self.path(spec).is_file()

    def clear(self) -> int:
        n = 0
        for p in self.directory.glob("*.json"):
            p.unlink()
            n += 1
        return n


def _write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path, "w") as f:  # a reader sees the old file or the new one, never half of one
        json.dump(obj, f, allow_nan=False, separators=(",", ":"), default=_json_default)


# ----------------------------------------------------------------------------------------------
# Prepared batches


class PreparedBatches:
    """A TokenDataset whose training batches (for one seed and shape) and validation batches are built
    once and shared by every run of a sweep; anything else is delegated to the dataset.

    The batches are exactly `data.batch_for_step(...)` / `data.iter_val_batches(...)`'s, so a run on a
    PreparedBatches has the numbers of the same run on the plain dataset.
    """

    def __init__(self, data, batch_size: int, seq_len: int, seed: int):
        self.data = data
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self._train: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._val: dict[int | None, list] = {}

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch_for_step(self, split, step, batch_size, seq_len, seed=None, **kwargs):
        seed = self.data.seed if seed is None else seed
        if split != "train" or kwargs or (batch_size, seq_len, seed) != (self.batch_size, self.seq_len, self.seed):
            return self.data.batch_for_step(split, step, batch_size, seq_len, seed, **kwargs)
        if step not in self._train:
            self._train[step] = self.data.batch_for_step(split, step, batch_size, seq_len, seed)
        return self._train[step]

    def iter_val_batches(self, batch_size, seq_len, max_batches=None, **kwargs):
        if kwargs or (batch_size, seq_len) != (self.batch_size, self.seq_len):
            yield from self.data.iter_val_batches(batch_size, seq_len, max_batches, **kwargs)
            return
        if max_batches not in self._val:
            self._val[max_batches] = list(self.data.iter_val_batches(batch_size, seq_len, max_batches))
        yield from self._val[max_batches]


@lru_cache(maxsize=4)
def _dataset(corpus: str):
    from ..data import load_corpus, make_dataset

    return make_dataset(load_corpus(corpus, progress=False))


# ----------------------------------------------------------------------------------------------
# Running


class _Watch:
    """train() callback: keeps the rows (so a run stopped by an exception still has its history) and,
    for MuonClip, after a step that clipped, measures the max logit on that step's batch again."""

    def __init__(self, model, optimizer, data, spec: RunSpec):
        self.model, self.optimizer, self.data, self.spec = model, optimizer, data, spec
        self.rows: list[dict] = []

    @torch.no_grad()
    def __call__(self, step, row):
        if row is None or row.get("step") != step:
            return
        self.rows.append(row)
        if self.spec.optimizer != "muonclip":
            return
        gamma = getattr(self.optimizer, "last_gamma", None)
        if gamma is None or not bool((gamma < 1).any()):
            return
        x, _ = self.data.batch_for_step("train", step, self.spec.batch_size, self.spec.seq_len, seed=self.spec.data_seed)
        x = x.to(next(self.model.parameters()).device)
        after = self.model(x, telemetry=True).telemetry.max_logits.float().cpu()  # (layers, heads)
        row["post_clip_max_logit"] = float(after.max())
        row["post_clip_max_logit_clipped"] = float(after[(gamma < 1).cpu()].max())


def run_one(spec: RunSpec, data=None, *, progress: bool = False) -> RunResult:
    """Train one run as `spec` says (no cache); `data` is a TokenDataset or PreparedBatches."""
    from ..model import K2ForCausalLM
    from ..optim import NonFiniteGradientError, build_optimizer
    from ..train import train

    data = data if data is not None else PreparedBatches(_dataset(spec.corpus), spec.batch_size, spec.seq_len, spec.data_seed)
    torch.manual_seed(spec.seed)
    model = K2ForCausalLM(spec.model_config())
    opt = build_optimizer(model, spec.optimizer, lr=spec.lr, weight_decay=spec.weight_decay, tau=spec.tau)
    watch = _Watch(model, opt, data, spec)
    settings = dict(batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.data_seed,
                    eval_every=spec.eval_every, eval_batches=spec.eval_batches)
    settings.update(spec.train_settings)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a diverged run is a result here, not a surprise
        try:
            history = train(model, data, opt, spec.steps, progress=progress, callback=watch, **settings)
        except (NonFiniteGradientError, ValueError) as e:
            # the loss was still finite but a gradient (or a max logit, for QK-Clip) was not: diverged
            if isinstance(e, ValueError) and "inf or nan" not in str(e):
                raise
            import pandas as pd

            history = pd.DataFrame(watch.rows)
            step = len(watch.rows)
            history.attrs.update(stop_reason=f"non-finite gradient or logit at step {step}", diverged=True)
    wall = time.perf_counter() - t0
    for col in CLIP_COLUMNS:
        if spec.optimizer == "muonclip" and col not in history:
            history[col] = float("nan")
    c = model.config
    return RunResult(spec=spec, history=history, diverged=bool(history.attrs.get("diverged", False)),
                     stop_reason=str(history.attrs.get("stop_reason", "")),
                     total_heads=c.num_hidden_layers * c.num_attention_heads, wall_s=wall,
                     machine=machine_description())


def run_sweep(
    specs: Iterable[RunSpec],
    *,
    cache: RunCache | str | os.PathLike | None | bool = None,
    data=None,
    progress: bool = False,
    refresh: bool = False,
) -> list[RunResult]:
    """Run every spec (or take it from the cache), in order; return their RunResults.

    cache: a RunCache, a folder, None for `default_cache_dir()`, or False for no caching.
    data: a TokenDataset to use instead of `spec.corpus` (its batches are prepared once per shape).
    refresh: recompute and overwrite cached runs.
    progress: one line per run (and train()'s bar) when True.
    """
    specs = list(specs)
    if cache is False:
        store = None
    elif isinstance(cache, RunCache):
        store = cache
    else:
        store = RunCache(cache)
    prepared: dict[tuple, PreparedBatches] = {}
    results = []
    for i, spec in enumerate(specs):
        hit = None if (store is None or refresh) else store.get(spec)
        if hit is not None:
            results.append(hit)
            if progress:
                print(f"[{i + 1}/{len(specs)}] {spec.name}: cached")
            continue
        base = data if data is not None else _dataset(spec.corpus)
        shape = (id(base), spec.batch_size, spec.seq_len, spec.data_seed)
        if shape not in prepared:
            prepared[shape] = PreparedBatches(base, spec.batch_size, spec.seq_len, spec.data_seed)
        result = run_one(spec, prepared[shape], progress=progress)
        if store is not None:
            store.put(result)
        if progress:
            print(f"[{i + 1}/{len(specs)}] {spec.name}: {result.wall_s:.1f} s"
                  + (f", {result.stop_reason}" if result.diverged else ""))
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------------
# Tables and records


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
        if c == "val_loss":
            agg[c] = "last"  # groupby's last skips NaN: the chunk's latest evaluation
        elif c in last:
            agg[c] = "last"
        elif "max_logit" in c:
            agg[c] = "max"
        else:
            agg[c] = "mean"
    return history[cols].groupby(chunk).agg(agg).reset_index(drop=True)


RECORD_COLUMNS = ("step", "tokens", "lr", "train_loss", "val_loss", "max_logit", "qk_clip/heads_clipped",
                  "qk_clip/frac_heads_ever_clipped", "post_clip_max_logit", "post_clip_max_logit_clipped")


def write_record(path: str | os.PathLike, results: Sequence[RunResult], *, command: str | None = None,
                 note: str = "", max_points: int = 250) -> Path:
    """A small committed record of a sweep: the command and machine, each run's spec, summary and a
    thinned history (the columns the notebooks plot). Written atomically."""
    command = command if command is not None else " ".join([Path(sys.executable).name] + sys.argv)
    summary = summarize(results)
    runs = []
    for r, (_, srow) in zip(results, summary.iterrows()):
        d = r.to_json()
        d["history"] = _frame_to_columns(thin_history(r.history, max_points, RECORD_COLUMNS))
        d["summary"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else
                            (v.item() if hasattr(v, "item") else v)) for k, v in srow.items()}
        runs.append(d)
    record = {"format": _FORMAT, "command": command, "note": note, "machine": machine_description(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "k2mini_version": _library_version(),
              "library_digest": library_digest(), "runs": runs}
    _write_json_atomic(Path(path), record)
    return Path(path)


def read_record(path: str | os.PathLike) -> tuple[dict, list[RunResult]]:
    """(metadata, runs) of a record written by `write_record`; histories are the thinned ones."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    import pandas as pd

    runs = [RunResult.from_json(d, from_cache=True) for d in record["runs"]]
    meta = {k: v for k, v in record.items() if k != "runs"}
    # the summaries were computed from the full histories; the stored histories are thinned
    meta["summary"] = pd.DataFrame([{k: (float("nan") if v is None else v) for k, v in d["summary"].items()}
                                    for d in record["runs"]])
    return meta, runs


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
