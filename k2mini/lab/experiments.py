"""The lab's one experiment framework: a run spec, a sweep runner, a cache of finished runs.

    specs = [RunSpec(optimizer=k, lr=lr, steps=300) for k in ("adamw", "muon", "muonclip") for lr in lrs]
    specs = [base.replace(seed=s, train={"balancing": m}) for m in METHODS for s in (0, 1, 2)]
    runs = run_sweep(specs)          # a list of RunResult, in the order of `specs`
    runs[0].history                  # one row per step (train(), minus the per-step loads)
    runs[0].loads                    # (steps, MoE layers, experts) token-slots per step
    runs[0].model                    # the trained model, rebuilt from the cached weights

A `RunSpec` is everything that decides a run's numbers: model preset and overrides, optimizer,
learning rate, weight decay, tau, steps, batch shape, seeds, corpus and train() settings (balancing,
schedule, ...). `run_sweep` prepares each batch shape's batches once and shares them between runs.
Finished runs are cached under `default_cache_dir()`, keyed by the settings, the torch version and a
digest of the code that decides training (`training_code_digest`): the core library minus the
checkpoint and analysis packages, plus this file. Editing a plot or a summary keeps the cache.
Entries are written atomically, weights first and the JSON last, so a reader sees a whole entry or
none. A cache written on another machine or under other float kernels is reused as it is: the
notebooks check claims that hold on any machine, never trained numbers at full precision.

MuonClip runs also record what QK-Clip achieved: after every step that clipped a head, the runner
re-runs the forward pass on that step's batch with the clipped weights and stores the largest max
logit (`post_clip_max_logit`, and `post_clip_max_logit_clipped` over the clipped heads only). train()
records `max_logit` BEFORE the step, so this is the honest test of "the clip holds".

Over 400 lines on purpose: this file is the one lab file digested into every cache key as training
code (a change to the spec, the batches or the runner changes what a run computes). Spec, runner and
cache kept in one file keep that set to exactly this file; the summaries, plots and studies built on
top of it live elsewhere and can change without invalidating a cached run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

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
    "training_code_digest",
    "machine_description",
    "default_cache_dir",
    "default_jobs",
    "CLIP_COLUMNS",
]

CLIP_COLUMNS = ("post_clip_max_logit", "post_clip_max_logit_clipped")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# packages of k2mini whose code does not decide a training run's numbers
_NOT_TRAINING = ("lab", "analysis", "checkpoint")
_FORMAT = 2  # bump when the cache entry layout changes


def default_cache_dir() -> Path:
    """``$K2MINI_RUN_CACHE`` if set, else ``<data root>/runs/cache`` (``data/runs/cache`` in a checkout)."""
    if os.environ.get("K2MINI_RUN_CACHE"):
        return Path(os.environ["K2MINI_RUN_CACHE"])
    from ..data import default_data_root

    return default_data_root() / "runs" / "cache"


def training_sources() -> list[Path]:
    """The source files whose code decides a run's numbers (see the module docstring)."""
    files = [p for p in _PACKAGE_DIR.rglob("*.py") if p.relative_to(_PACKAGE_DIR).parts[0] not in _NOT_TRAINING]
    return sorted(files + [Path(__file__).resolve()])


@lru_cache(maxsize=1)
def training_code_digest() -> str:
    """SHA-256 (first 16 hex digits) of `training_sources()`: editing any of them invalidates cached runs."""
    h = hashlib.sha256()
    for path in training_sources():
        h.update(path.relative_to(_PACKAGE_DIR).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    """Where numbers came from: OS, CPU, core count, torch threads and kernels, versions, accelerator."""
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
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

    `config` holds K2Config overrides on top of `preset` (e.g. ``{"n_routed_experts": 64}``), as a
    dict or a tuple of pairs; `train` holds the other train() settings (``balancing``,
    ``bias_update_speed``, ``schedule``, ``warmup_steps``, ``grad_clip``, ...). `seed` draws the
    initial weights (from its own generator, not the global RNG); `data_seed` the batch order (None:
    the same as `seed`, so two runs with the same seed see the same tokens in the same order).
    `label` names the run in plots and tables and is NOT part of the key.
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
    seed: int = 0
    data_seed: int | None = None
    corpus: str = "shakespeare"
    eval_every: int = 50
    eval_batches: int = 4
    train: Any = ()
    label: str = field(default="", compare=False)

    def __post_init__(self):
        # dicts are unhashable: store overrides as sorted tuples of pairs
        object.__setattr__(self, "config", _freeze(self.config))
        object.__setattr__(self, "train", _freeze(self.train))
        from ..optim import KINDS

        if self.optimizer not in KINDS:
            raise ValueError(f"RunSpec.optimizer must be one of {KINDS}, got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"RunSpec.lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"RunSpec.steps must be a positive int, got {self.steps!r}")
        for name in ("seed", "batch_size", "seq_len"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"RunSpec.{name} must be an int, got {getattr(self, name)!r}")
        clash = {"steps", "seed", "batch_size", "seq_len", "eval_every", "eval_batches"} & set(self.train_settings)
        if clash:
            raise ValueError(f"RunSpec.train must not set {sorted(clash)}: they are RunSpec fields")

    # -- derived
    @property
    def config_overrides(self) -> dict:
        return _thaw(self.config)

    @property
    def train_settings(self) -> dict:
        return _thaw(self.train)

    @property
    def batch_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        tau = f" tau={self.tau:g}" if self.optimizer == "muonclip" else ""
        return f"{self.optimizer}{tau} lr={self.lr:g}"

    def get(self, name: str, default=None):
        """A setting by name: a field, else a train() setting, else a config override, else `default`."""
        if name in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, name)
        return self.train_settings.get(name, self.config_overrides.get(name, default))

    def settings(self) -> dict:
        """The settings that decide the numbers, as plain JSON-able data (no label)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "label"}
        d["config"] = self.config_overrides
        d["train"] = self.train_settings
        d["data_seed"] = self.batch_seed
        if self.optimizer != "muonclip":
            d["tau"] = None  # tau does not change an adamw or muon run
        return d

    @classmethod
    def from_settings(cls, settings: dict, label: str = "") -> "RunSpec":
        """The inverse of `settings()`."""
        s = dict(settings)
        if s.get("tau") is None:
            s["tau"] = cls.tau
        return cls(**s, label=label)

    def key(self) -> str:
        """Hash of the settings, the torch version and the training code's digest (24 hex digits)."""
        payload = {"settings": self.settings(), "torch": torch.__version__, "code": training_code_digest(),
                   "format": _FORMAT}
        blob = json.dumps(payload, sort_keys=True, default=_json_default).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    # Two specs are the same run when their settings are: `data_seed=None` equals `data_seed=seed`, the
    # tau of a non-MuonClip run is ignored, and a spec read back from `settings()` equals its original.
    def __eq__(self, other):
        return self.key() == other.key() if isinstance(other, RunSpec) else NotImplemented

    def __hash__(self):
        return hash(self.key())

    def model_config(self):
        from ..config import K2Config

        return K2Config.preset(self.preset).replace(**self.config_overrides)

    def replace(self, **changes) -> "RunSpec":
        """A copy with fields changed; ``train=`` and ``config=`` dicts are merged into the current ones."""
        for name, current in (("train", self.train_settings), ("config", self.config_overrides)):
            if isinstance(changes.get(name), dict):
                changes[name] = {**current, **changes[name]}
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
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


@dataclass
class RunResult:
    """A finished run: its spec, history (a DataFrame, one row per step), per-step expert loads,
    how it ended, its cost, and its trained weights (`model` rebuilds the model from them)."""

    spec: RunSpec
    history: Any  # pandas.DataFrame
    diverged: bool
    stop_reason: str
    total_heads: int
    wall_s: float
    cpu_s: float = 0.0
    loads: np.ndarray | None = None  # (logged steps, MoE layers, experts) int64
    machine: dict = field(default_factory=dict)
    from_cache: bool = False
    state: dict | None = field(default=None, repr=False)  # trained weights, or None
    state_path: Path | None = field(default=None, repr=False)  # ... or where the cache keeps them

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model(self):
        """The trained model (eval mode), rebuilt from the weights; None when they were not kept."""
        if self.state is None and self.state_path is not None:
            self.state = torch.load(self.state_path, map_location="cpu", weights_only=True)["state"]
        if self.state is None:
            return None
        from ..model import K2ForCausalLM

        model = K2ForCausalLM(self.spec.model_config())
        model.load_state_dict(self.state)
        return model.eval()

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

    def to_json(self, history=None) -> dict:
        return {
            "format": _FORMAT,
            "key": self.spec.key(),
            "spec": self.spec.settings(),
            "label": self.spec.label,
            "training_code": training_code_digest(),
            "diverged": self.diverged,
            "stop_reason": self.stop_reason,
            "total_heads": self.total_heads,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "machine": self.machine,
            "history": frame_to_columns(self.history if history is None else history),
        }

    @classmethod
    def from_json(cls, d: dict, from_cache: bool = False) -> "RunResult":
        return cls(spec=RunSpec.from_settings(d["spec"], d.get("label", "")), history=columns_to_frame(d["history"]),
                   diverged=bool(d["diverged"]), stop_reason=d["stop_reason"], total_heads=int(d["total_heads"]),
                   wall_s=_float(d.get("wall_s")), cpu_s=_float(d.get("cpu_s")), machine=d.get("machine", {}),
                   from_cache=from_cache)


def _float(v) -> float:
    return float("nan") if v is None else float(v)


def frame_to_columns(df) -> dict:
    """A history DataFrame as JSON-able columns (non-finite numbers as null)."""
    out = {}
    for col in df.columns:
        values = df[col].tolist()
        out[col] = [None if (isinstance(v, float) and not math.isfinite(v)) else v for v in values]
    return out


def columns_to_frame(cols: dict):
    import pandas as pd

    frame = {k: pd.to_numeric(pd.Series([float("nan") if x is None else x for x in v], dtype="float64"))
             for k, v in cols.items()}
    df = pd.DataFrame(frame)
    for c in ("step", "tokens"):
        if c in df:
            df[c] = df[c].astype("int64")
    return df


# ----------------------------------------------------------------------------------------------
# The on-disk cache


class RunCache:
    """Finished runs, named by `RunSpec.key()`: `<key>.pt` (weights and loads), then `<key>.json`
    (spec, history, how it ended); both written atomically, the JSON last."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, spec: RunSpec) -> Path:
        return self.directory / f"{spec.key()}.json"

    def get(self, spec: RunSpec) -> RunResult | None:
        path = self.path(spec)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            tensors = torch.load(path.with_suffix(".pt"), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as e:  # damaged entry: recompute it
            warnings.warn(f"{path}: unreadable cache entry ({type(e).__name__}), it will be recomputed", stacklevel=2)
            return None
        if d.get("key") != spec.key():
            return None
        result = RunResult.from_json(d, from_cache=True)
        result.spec = spec  # keep the caller's label
        result.loads = None if tensors.get("loads") is None else tensors["loads"].numpy()
        result.state_path = path.with_suffix(".pt")
        return result

    def put(self, result: RunResult) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(result.spec)
        loads = None if result.loads is None else torch.from_numpy(np.ascontiguousarray(result.loads))
        with atomic_write(path.with_suffix(".pt"), "wb") as f:
            torch.save({"state": result.state, "loads": loads}, f)
        write_json(path, result.to_json())
        return path

    def __contains__(self, spec: RunSpec) -> bool:
        return self.path(spec).is_file()

    def clear(self) -> int:
        """Delete every entry; returns how many there were."""
        n = 0
        for p in self.directory.glob("*.json"):
            p.with_suffix(".pt").unlink(missing_ok=True)
            p.unlink()
            n += 1
        for p in self.directory.glob("*.pt"):  # weights whose JSON was never written (an interrupted put)
            p.unlink(missing_ok=True)
        return n


def write_json(path: Path, obj) -> None:
    """JSON, atomically: a reader sees the old file or the new one, never half of one."""
    with atomic_write(path, "w") as f:
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
    """train() callback: for MuonClip, after a step that clipped, measures the max logit on that step's
    batch again (added to the step's history row)."""

    def __init__(self, model, optimizer, data, spec: RunSpec):
        self.model, self.optimizer, self.data, self.spec = model, optimizer, data, spec

    @torch.no_grad()
    def __call__(self, step, row):
        if row is None or row.get("step") != step:
            return
        if self.spec.optimizer != "muonclip":
            return
        gamma = getattr(self.optimizer, "last_gamma", None)
        if gamma is None or not bool((gamma < 1).any()):
            return
        x, _ = self.data.batch_for_step("train", step, self.spec.batch_size, self.spec.seq_len, seed=self.spec.batch_seed)
        x = x.to(next(self.model.parameters()).device)
        after = self.model(x, telemetry=True).telemetry.max_logits.float().cpu()  # (layers, heads)
        row["post_clip_max_logit"] = float(after.max())
        row["post_clip_max_logit_clipped"] = float(after[(gamma < 1).cpu()].max())


def build_model(spec: RunSpec):
    """The run's freshly initialized model: its weights depend only on (model config, seed)."""
    from ..model import K2ForCausalLM

    model = K2ForCausalLM(spec.model_config())
    model.reset_parameters(torch.Generator().manual_seed(spec.seed))
    return model


def run_one(spec: RunSpec, data=None, *, progress: bool = False) -> RunResult:
    """Train one run as `spec` says (no cache); `data` is a TokenDataset or PreparedBatches."""
    from .. import train
    from ..optim import build_optimizer

    if data is None:
        data = PreparedBatches(_dataset(spec.corpus), spec.batch_size, spec.seq_len, spec.batch_seed)
    model = build_model(spec)
    opt = build_optimizer(model, spec.optimizer, lr=spec.lr, weight_decay=spec.weight_decay, tau=spec.tau)
    watch = _Watch(model, opt, data, spec)
    settings = dict(batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.batch_seed,
                    eval_every=spec.eval_every, eval_batches=spec.eval_batches)
    settings.update(spec.train_settings)
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a diverged run is a result here, not a surprise
        # a non-finite loss, gradient or max logit ends the run with history.attrs["stop_reason"]
        history = train(model, data, opt, spec.steps, progress=progress, callback=watch, **settings)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    loads = None
    if "load" in history:
        got = [v for v in history["load"] if v is not None]
        loads = np.stack([np.asarray(v, dtype=np.int64) for v in got]) if got else None
        history = history.drop(columns="load")
    for col in CLIP_COLUMNS:
        if spec.optimizer == "muonclip" and col not in history:
            history[col] = float("nan")
    c = model.config
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return RunResult(spec=spec, history=history, diverged=bool(history.attrs.get("diverged", False)),
                     stop_reason=str(history.attrs.get("stop_reason", "")),
                     total_heads=c.num_hidden_layers * c.num_attention_heads, wall_s=wall, cpu_s=cpu, loads=loads,
                     machine=machine_description(), state=state)


WORKER_MEMORY = 2**30  # bytes a sweep's worker process may take: torch, a corpus, a small run (~0.4 GB measured)


def default_jobs() -> int:
    """How many one-thread processes a notebook's sweep trains in: ``$K2MINI_JOBS`` if set, else the CPUs
    this process may run on, but no more than the memory available holds (`WORKER_MEMORY` each). Every
    run does the same one-thread arithmetic in any process, so the number changes the wall time only.
    ``make test`` sets 1: it already runs two notebooks side by side."""
    value = os.environ.get("K2MINI_JOBS", "").strip()
    if not value:
        from ..checkpoint.load import available_memory

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        free = available_memory("cpu", swap=False)
        return max(1, min(cpus, free // WORKER_MEMORY)) if free is not None else cpus
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ValueError(f"K2MINI_JOBS must be a whole number of processes >= 1, got {value!r}")
    return jobs


class _SharedBatches:
    """Batches for the runs of one sweep (or of one worker process of it): each corpus loaded once and
    each batch shape prepared once, or `data`'s if given."""

    def __init__(self, data=None):
        self.data, self.corpora, self.prepared = data, {}, {}

    def __call__(self, spec: RunSpec) -> PreparedBatches:
        base = self.data
        if base is None:
            if spec.corpus not in self.corpora:
                self.corpora[spec.corpus] = _dataset(spec.corpus)
            base = self.corpora[spec.corpus]
        shape = (id(base), spec.batch_size, spec.seq_len, spec.batch_seed)
        if shape not in self.prepared:
            self.prepared[shape] = PreparedBatches(base, spec.batch_size, spec.seq_len, spec.batch_seed)
        return self.prepared[shape]


_WORKER_BATCHES: _SharedBatches | None = None  # a worker process's, for the runs of its sweep it trains


def _run_in_worker(spec: RunSpec) -> RunResult:
    global _WORKER_BATCHES
    torch.set_num_threads(1)
    _WORKER_BATCHES = _WORKER_BATCHES or _SharedBatches()
    return run_one(spec, _WORKER_BATCHES(spec))


def run_sweep(
    specs: Iterable[RunSpec],
    *,
    cache: RunCache | str | os.PathLike | None | bool = None,
    data=None,
    progress: bool = True,
    refresh: bool = False,
    jobs: int = 1,
) -> list[RunResult]:
    """Run every spec (or take it from the cache), in order; return their RunResults.

    cache: a RunCache, a folder, None for `default_cache_dir()`, or False for no caching.
    data: a TokenDataset to use instead of `spec.corpus` (its batches are prepared once per shape).
    refresh: recompute and overwrite cached runs.
    progress: a bar over the runs (tqdm.auto).
    jobs: > 1 trains the uncached runs in that many processes of one thread each (not with `data`).
        A worker that dies (killed, out of memory) ends the sweep with a RuntimeError naming the runs
        lost; every run finished before is in the cache.
    A run whose cache entry cannot be written (a full disk) is still returned, with a warning.
    """
    from tqdm.auto import tqdm

    specs = list(specs)
    store = None if cache is False else cache if isinstance(cache, RunCache) else RunCache(cache)
    results: list[RunResult | None] = [None if (store is None or refresh) else store.get(s) for s in specs]
    todo = [i for i, r in enumerate(results) if r is None]
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="runs", disable=not progress)
    if jobs > 1 and len(todo) > 1:
        if data is not None:
            raise ValueError("run_sweep: jobs > 1 trains on each spec's corpus; pass data=None")
        for i, result in _in_workers(specs, todo, jobs):
            results[i] = _finish(result, store, bar)
    else:
        batches = _SharedBatches(data)
        for i in todo:
            results[i] = _finish(run_one(specs[i], batches(specs[i])), store, bar)
    bar.close()
    return results


def _in_workers(specs: list[RunSpec], todo: list[int], jobs: int):
    """(index, RunResult) for each spec of `todo`, as worker processes finish them (spawned processes:
    they import the caller's main module, which must therefore be a file)."""
    import multiprocessing as mp
    import sys
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    if getattr(mp.current_process(), "_inheriting", False):  # a spawned worker importing the caller's script
        raise RuntimeError(
            f"run_sweep(jobs={jobs}) was called while a worker process was importing the main script to start: "
            'a script that runs a sweep with jobs > 1 must start it under `if __name__ == "__main__":`'
        )
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main is not None and not os.path.exists(main):
        raise RuntimeError(
            f"run_sweep(jobs={jobs}): worker processes start by importing the main script, and {main!r} is not "
            "a file (a script read from stdin?); save it to a file and run that, or pass jobs=1"
        )
    pool = ProcessPoolExecutor(min(jobs, len(todo)), mp_context=mp.get_context("spawn"))
    futures = {pool.submit(_run_in_worker, specs[i]): i for i in todo}
    try:
        lost, failed = [], None
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                lost.append(specs[futures[future]].name)
                continue
            except Exception as e:  # a run that raised: the others still finish and are cached, then it is raised
                failed = failed or e
                continue
            yield futures[future], result  # cached by the caller before the next one
        if failed is not None:
            raise failed
        if lost:
            raise RuntimeError(
                f"run_sweep: a worker process died (killed, out of memory, or it failed to import the main "
                f"script: see above) and took {len(lost)} unfinished run(s) with it: {lost}. The runs that finished "
                "are cached; run the sweep again (jobs=1, or fewer jobs if memory is short) to train the rest"
            )
    finally:
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _finish(result: RunResult, store: RunCache | None, bar) -> RunResult:
    if store is not None:
        try:
            store.put(result)
        except OSError as e:  # the run is trained: keep it, even if the cache cannot
            warnings.warn(f"run {result.name!r} was trained but not cached: {e}", RuntimeWarning, stacklevel=3)
    bar.update(1)
    return result
