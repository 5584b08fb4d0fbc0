"""Cached, deterministically trained minis for the notebooks that need trained weights.

`pretrained_mini(name)` trains a named CPU mini on the real corpora the first time it is called (a few
minutes on 2 cores), saves it under `data/minis/` in Kimi-K2's fp8 checkpoint format, and beside it in
Kimi-K2-Thinking's (`format="int4"`: INT4 routed experts) and unquantized (`format="float32"`), and
returns the checkpoint's path thereafter. The cache key covers the recipe and CACHE_FORMAT, so changing a recipe,
or how a checkpoint is written, retrains instead of serving stale files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .. import locks
from ..checkpoint import save_pretrained
from ..config import K2Config
from ..data import default_data_root, load_corpus, make_dataset
from ..model import K2ForCausalLM
from ..optim import build_optimizer
from ..training import train

# name -> how to make it. Mixed prose + code so that domain specialization has something to show.
_MINI_RECIPE = dict(
    preset="k2-mini",
    corpora={"shakespeare": None, "python-stdlib": 2_000_000},  # bytes per corpus (None: all)
    steps=240,
    batch_size=8,
    seq_len=128,
    lr=3e-3,
    optimizer="adamw",
    balancing="loss_free",
    bias_update_speed=1e-2,  # notebook 02: DeepSeek-V3's 1e-3 is too slow to balance a run this short
    warmup_steps=20,
    schedule="cosine",
    seed=0,
)

RECIPES: dict[str, dict] = {
    "k2-mini": _MINI_RECIPE,
    "k2-micro": dict(  # a smaller, faster sibling for tests and quick looks
        preset="k2-micro",
        corpora={"shakespeare": 1_000_000, "python-stdlib": 500_000},
        steps=60,
        batch_size=8,
        seq_len=64,
        **{k: _MINI_RECIPE[k] for k in ("lr", "optimizer", "balancing", "bias_update_speed", "schedule", "seed")},
        warmup_steps=5,
    ),
}


# Bump when what save_pretrained writes changes (config.json fields, header layout): old caches then
# stay untouched under their old names and the next call trains afresh.
# 3: shards written by the safetensors library; the int4 and float32 copies.
CACHE_FORMAT = 3
FORMATS = ("fp8", "int4", "float32")  # as Kimi-K2 publishes, as Kimi-K2-Thinking does, unquantized


def _key(recipe: dict) -> str:
    keyed = {"recipe": recipe, "format": CACHE_FORMAT}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def mini_path(name: str = "k2-mini", root: str | os.PathLike | None = None, format: str = "fp8") -> Path:
    """Where the cached checkpoint of mini `name` in `format` lives (whether or not it exists yet)."""
    if name not in RECIPES:
        raise ValueError(f"unknown mini {name!r}; choose from {sorted(RECIPES)}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {FORMATS}")

    root = Path(root) if root is not None else Path(default_data_root())
    return root / "minis" / f"{name}-{_key(RECIPES[name])}{'' if format == 'fp8' else '-' + format}"


def pretrained_mini(
    name: str = "k2-mini",
    root: str | os.PathLike | None = None,
    progress: bool = True,
    retrain: bool = False,
    format: str = "fp8",
) -> Path:
    """Path to the checkpoint of mini `name`, training and caching it first if needed.

    format: "fp8" (Kimi-K2's format), "int4" (Kimi-K2-Thinking's: INT4 routed experts, the rest
    bf16) or "float32" (unquantized): the same trained weights, saved three ways at once.
    Load it with `k2mini.load_pretrained(path)`; `path / "training.json"` records the recipe, the
    history summary and the machine it was trained on.
    """
    path = mini_path(name, root, format)
    if (path / "training.json").exists() and not retrain:
        return path

    # two processes asking at once (notebooks run side by side): the second waits, then finds it cached
    lock = path.parent / f".{mini_path(name, root).name}.lock"
    with locks.hold(lock, f"training pretrained_mini {name!r}", blocking=True, say_waiting=False):
        if (path / "training.json").exists() and not retrain:
            return path
        return _train_and_save(name, root, path, progress)


def _train_and_save(name: str, root, path: Path, progress: bool) -> Path:
    recipe = RECIPES[name]

    corpora = [load_corpus(c, max_bytes=n) for c, n in recipe["corpora"].items()]
    data = make_dataset(corpora, seed=recipe["seed"])
    torch.manual_seed(recipe["seed"])
    model = K2ForCausalLM(K2Config.preset(recipe["preset"]))
    if recipe["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    else:

        optimizer = build_optimizer(model, recipe["optimizer"], lr=recipe["lr"])
    history = train(
        model, data, optimizer, recipe["steps"], batch_size=recipe["batch_size"], seq_len=recipe["seq_len"],
        seed=recipe["seed"], balancing=recipe["balancing"], bias_update_speed=recipe["bias_update_speed"],
        warmup_steps=recipe["warmup_steps"], schedule=recipe["schedule"], eval_every=recipe["steps"],
        log_every=10, progress=progress, on_nonfinite="raise",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.training-", dir=path.parent))
    try:
        final = history.iloc[-1]
        record = {
            "name": name,
            "recipe": recipe,
            "final_train_loss": float(final["train_loss"]),
            "final_val_loss": float(final["val_loss"]),
            "wall_time_s": float(final["wall_time"]),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
        }
        for fmt in FORMATS:
            quantization = None if fmt == "float32" else fmt
            staged = save_pretrained(model.eval(), tmp / fmt, quantization=quantization, progress=False)
            (staged / "training.json").write_text(json.dumps(record, indent=2) + "\n")
            target = mini_path(name, root, fmt)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)  # training.json inside marks it complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
