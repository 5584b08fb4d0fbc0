"""Long context in miniature (notebook 07): train short, read long, as K2 went from 4K to 128K.

A k2-micro is trained on Shakespeare's bytes at `TRAINED_LEN` tokens, then read at `s` times that
length with the rope frequencies stretched four ways (each one a `rope_scaling` the library reads):

    plain     no scaling: positions past TRAINED_LEN give rotation angles the model never saw
    linear    position interpolation: every frequency divided by s
    dynamic   NTK-aware: the base grows with the length, the highest frequency stays
    yarn      K2's: fast dimensions kept, slow ones interpolated, logits scaled by mscale^2

and each of them once more after a short continued training at the long length (K2's annealing
stage). A fraction of every training sequence carries a "planted key": `KEY_LEN` random bytes that
appear twice, so the model learns to copy; at the long length the key is planted at the start and
asked for near the end (retrieval by distance).

The model's rope dims are K2's in proportion: rope_theta = 50,000 * TRAINED_LEN / 4,096, so the
trained length holds as many rotations of each frequency as K2's 4,096 tokens did.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from ..atomic import atomic_write
from ..attention import mla_logits
from ..config import K2Config
from ..model import K2ForCausalLM
from ..optim import build_optimizer
from ..rope import rope_cos_sin, rope_frequencies, rope_type
from ..training import train
from .attention_costs import kv_cache_bytes
from .experiments import RunCache, RunSpec, default_cache_dir, run_one, training_code_digest

TRAINED_LEN = 64
KEY_LEN = 8
METHODS = ("plain", "linear", "dynamic", "yarn")
K2_YARN = dict(beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)  # K2's config.json


def mini_rope_theta(trained_len: int = TRAINED_LEN) -> float:
    """K2's rope_theta (50,000 over 4,096 trained tokens) scaled to the miniature's trained length."""
    return 50000.0 * trained_len / 4096


# ----------------------------------------------------------------------------------------------
# The four ways of stretching the frequencies, as K2Config overrides


def rope_overrides(method: str, trained_len: int, length: int) -> dict:
    """K2Config fields that read a model trained at `trained_len` tokens at `length` tokens.

    "yarn_no_mscale" is yarn's frequencies without its attention scale (attention_factor 1, no
    mscale_all_dim): the ablation of the softmax correction alone.
    """
    factor = float(length) / trained_len
    if method == "plain":
        return {"rope_scaling": None}
    if method == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": factor}}
    if method == "dynamic":  # its base grows past max_position_embeddings, so that is the trained length
        return {"rope_scaling": {"rope_type": "dynamic", "factor": factor}, "max_position_embeddings": trained_len}
    if method in ("yarn", "yarn_no_mscale"):
        rs = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained_len}
        if method == "yarn":
            rs.update(K2_YARN)
        else:
            rs.update(beta_fast=1.0, beta_slow=1.0, attention_factor=1.0)
        return {"rope_scaling": rs, "max_position_embeddings": int(length)}
    raise ValueError(f"method must be one of {METHODS + ('yarn_no_mscale',)}, got {method!r}")


def with_rope(model: K2ForCausalLM, method: str, trained_len: int, length: int) -> K2ForCausalLM:
    """The same weights under another rope scaling (a new model; `model` is untouched)."""
    config = model.config.replace(**rope_overrides(method, trained_len, length))
    out = K2ForCausalLM(config)
    out.load_state_dict(model.state_dict())
    return out.eval()


# ----------------------------------------------------------------------------------------------
# Data: Shakespeare with planted keys


class PlantedKeys:
    """A TokenDataset whose training windows carry, with probability `fraction`, a key of `key_len`
    random bytes written twice: once at a random early position, once later (any distance that
    fits). Deterministic in (seed, step). Validation batches are the plain text."""

    def __init__(self, data, fraction: float = 0.5, key_len: int = KEY_LEN):
        if not 0 <= fraction <= 1:
            raise ValueError(f"PlantedKeys.fraction must be in [0, 1], got {fraction!r}")
        self.data, self.fraction, self.key_len = data, fraction, key_len

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch_for_step(self, split, step, batch_size, seq_len, seed=None, **kwargs):
        x, y = self.data.batch_for_step(split, step, batch_size, seq_len, seed, **kwargs)
        if split != "train" or seq_len + 1 < 2 * self.key_len + 1:
            return x, y
        window = torch.cat([x, y[:, -1:]], dim=1)  # (B, T + 1)
        g = torch.Generator().manual_seed(hash_seed("planted", seed, step, seq_len))
        k, n = self.key_len, window.shape[1]
        for row in range(batch_size):
            if torch.rand((), generator=g) >= self.fraction:
                continue
            key = torch.randint(0, 256, (k,), generator=g)
            a = int(torch.randint(0, n - 2 * k + 1, (), generator=g))
            b = int(torch.randint(a + k, n - k + 1, (), generator=g))
            window[row, a : a + k] = key
            window[row, b : b + k] = key
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def hash_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 62) - 1)


def retrieval_batch(data, length: int, distance: int, n: int, key_len: int = KEY_LEN, seed: int = 0, start: int = 4):
    """`n` validation windows of `length` tokens with a key at `start` and again `distance` tokens
    after its end. Returns (x, y, where): y[:, where] are the key's bytes 2..key_len of the second copy,
    the ones a model that copies predicts from the bytes before them."""
    b = start + key_len + distance
    if b + key_len > length:
        raise ValueError(f"retrieval_batch: distance {distance} does not fit in {length} tokens")
    starts = data.val_starts(length, n)
    idx = starts[:, None] + torch.arange(length + 1)
    window = data.tokens[idx].long()
    g = torch.Generator().manual_seed(hash_seed("retrieval", seed, length, distance))
    keys = torch.randint(0, 256, (len(starts), key_len), generator=g)
    window[:, start : start + key_len] = keys
    window[:, b : b + key_len] = keys
    where = torch.arange(b, b + key_len - 1)  # x[:, t] predicts y[:, t] = window[:, t + 1]
    return window[:, :-1], window[:, 1:], where


# ----------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def loss_by_position(model, data, length: int, n: int = 4) -> torch.Tensor:
    """Cross-entropy (nats per byte) at every position, averaged over `n` validation windows: (length,)."""
    x, y = next(data.iter_val_batches(n, length, max_batches=1))
    logits = model(x).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(x.shape).mean(0)


def bucketed(values: torch.Tensor, size: int) -> np.ndarray:
    """Means over consecutive buckets of `size` positions."""
    v = torch.as_tensor(values, dtype=torch.float64)
    return v[: len(v) // size * size].view(-1, size).mean(1).numpy()


@torch.no_grad()
def retrieval_accuracy(model, data, length: int, distances, n: int = 16, seed: int = 0) -> np.ndarray:
    """Share of the planted key's bytes (2..KEY_LEN of the second copy) predicted exactly (greedy)."""
    out = []
    for d in distances:
        x, y, where = retrieval_batch(data, length, int(d), n, seed=seed)
        pred = model(x).logits[:, where].argmax(-1)
        out.append(float((pred == y[:, where]).float().mean()))
    return np.array(out)


def _cos_sin(model: K2ForCausalLM, T: int):
    inv_freq = model.inv_freq
    if rope_type(model.config) == "dynamic":  # as K2ForCausalLM.forward does
        inv_freq = rope_frequencies(model.config, seq_len=T)[0]
    return rope_cos_sin(torch.arange(T), inv_freq, model.rope_attention_factor)


@torch.no_grad()
def attention_by_position(model: K2ForCausalLM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer and query position: the attention entropy (nats, mean over heads and batch) and the
    largest pre-softmax logit (softmax scale included, max over heads, keys and batch, as QK-Clip
    watches it). Returns {"entropy": (layers, T), "max_logit": (layers, T)}."""

    T = x.shape[1]
    cos, sin = _cos_sin(model, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    h = model.model.embed_tokens(x)
    entropy, max_logit = [], []
    for layer in model.model.layers:
        attn = layer.self_attn
        a_in = layer.input_layernorm(h)
        q_nope, q_rope = attn.queries(a_in, cos, sin)
        kv_latent, k_rope = attn.latent(a_in, cos, sin)
        kv = rearrange(attn.kv_b_proj(kv_latent), "b s (h d) -> b h s d", h=attn.num_heads)
        k_nope = kv[..., : attn.qk_nope_head_dim]
        logits = mla_logits(q_nope, q_rope, k_nope, k_rope, attn.scale).float()  # (B, H, T, S)
        logits = logits.masked_fill(~mask, float("-inf"))
        p = logits.softmax(-1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, H, T)
        entropy.append(ent.mean((0, 1)))
        max_logit.append(logits.amax((0, 1, 3)))
        h = layer(h, cos, sin)[0]
    return {"entropy": torch.stack(entropy), "max_logit": torch.stack(max_logit)}


# ----------------------------------------------------------------------------------------------
# Training: the short base run (the run cache) and the continued training at the long length


@dataclass(frozen=True)
class StudyScale:
    seeds: tuple = (0, 1)
    base_steps: int = 150
    base_batch: int = 16
    long_factor: int = 8  # the continued training's length is long_factor * TRAINED_LEN
    continue_steps: int = 30
    continue_lr: float = 1e-3
    eval_windows: int = 4
    retrieval_windows: int = 16
    lr: float = 3e-3


SCALES = {
    "ci": StudyScale(),
    "full": StudyScale(seeds=(0, 1, 2), base_steps=600, continue_steps=120, eval_windows=16, retrieval_windows=64),
}


def base_spec(seed: int, scale: StudyScale) -> RunSpec:
    return RunSpec(optimizer="adamw", lr=scale.lr, steps=scale.base_steps, preset="k2-micro",
                   config={"rope_theta": mini_rope_theta(), "max_position_embeddings": TRAINED_LEN},
                   batch_size=scale.base_batch, seq_len=TRAINED_LEN, seed=seed, eval_every=50, eval_batches=2,
                   label=f"base seed {seed}")


def cache_dir():
    """The study's own corner of the run cache: its runs train on planted keys, which a RunSpec does not say."""
    return default_cache_dir() / "long_context"


def train_base(spec: RunSpec, data, cache: bool = True):
    """The short run (a RunResult), trained on `PlantedKeys(data)`, cached under `cache_dir()`."""
    store = RunCache(cache_dir()) if cache else None
    hit = store.get(spec) if store else None
    if hit is not None:
        return hit
    result = run_one(spec, PlantedKeys(data))
    if store:
        store.put(result)
    return result


def continue_training(base, method: str, scale: StudyScale, data, cache: bool = True) -> K2ForCausalLM:
    """The base run's weights trained `continue_steps` more steps at long_factor * TRAINED_LEN tokens,
    under `method`'s rope scaling (the same number of tokens per step as the short run)."""

    length = scale.long_factor * TRAINED_LEN
    start = with_rope(base.model, method, TRAINED_LEN, length)
    batch = max(1, scale.base_batch * TRAINED_LEN // length)
    payload = {"base": base.spec.key(), "method": method, "length": length, "steps": scale.continue_steps,
               "lr": scale.continue_lr, "batch": batch, "code": training_code_digest(), "torch": str(torch.__version__),
               "planted": [0.5, KEY_LEN], "study": 1}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / f"continued-{key}.pt"
    if cache and path.is_file():
        start.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state"])
        return start.eval()
    start.train()
    opt = build_optimizer(start, "adamw", lr=scale.continue_lr, weight_decay=0.1)
    t0 = time.perf_counter()
    history = train(start, PlantedKeys(data), opt, scale.continue_steps, batch_size=batch, seq_len=length,
                    seed=base.spec.seed + 1000, eval_every=scale.continue_steps, eval_batches=1, progress=False)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            torch.save({"state": start.state_dict(), "payload": payload, "wall_s": time.perf_counter() - t0,
                        "train_loss": history["train_loss"].tolist()}, f)
    return start.eval()


# ----------------------------------------------------------------------------------------------
# The study


def run_study(scale: StudyScale, data, lengths=None, distances=None, progress: bool = True, cache: bool = True):
    """Every seed x method x (as trained, continued): loss by position at each length, retrieval
    accuracy by distance at the long length, and the attention statistics of yarn with and without
    its mscale. Returns a dict of plain arrays (see the notebook)."""

    long = scale.long_factor * TRAINED_LEN
    lengths = lengths or (long,)
    distances = distances or (16, 3 * TRAINED_LEN // 2, long // 2, long - 2 * KEY_LEN - 8)
    out = {"loss": {}, "retrieval": {}, "short_loss": {}, "base": {}, "distances": list(distances),
           "lengths": list(lengths), "long": long}
    bar = tqdm(total=len(scale.seeds) * len(METHODS) * 2, desc="arms", disable=not progress)
    for seed in scale.seeds:
        base = train_base(base_spec(seed, scale), data, cache=cache)
        out["base"][seed] = base
        trained = base.model
        out["short_loss"][seed] = loss_by_position(trained, data, TRAINED_LEN, scale.eval_windows).numpy()
        for method in METHODS:
            for stage in ("as trained", "continued"):
                if stage == "continued":
                    models = {long: continue_training(base, method, scale, data, cache=cache)}
                    models = {L: with_rope(models[long], method, TRAINED_LEN, L) if L != long else models[long]
                              for L in lengths}
                else:
                    models = {L: with_rope(trained, method, TRAINED_LEN, L) for L in lengths}
                for L, m in models.items():
                    out["loss"][(seed, method, stage, L)] = loss_by_position(m, data, L, scale.eval_windows).numpy()
                out["retrieval"][(seed, method, stage)] = retrieval_accuracy(
                    models[long], data, long, distances, scale.retrieval_windows, seed=seed)
                bar.update(1)
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------
# The measure behind notebook 07's claims (the claims: k2mini.lab.claims.long_context)


def long_read_gap(loss_long, loss_short, trained_len: int = TRAINED_LEN) -> float:
    """Mean loss over the positions past the trained length minus the trained model's mean loss over
    its own trained length (nats/byte): <= 0 when reading long costs nothing."""
    return float(np.mean(np.asarray(loss_long)[trained_len:]) - np.mean(np.asarray(loss_short)[:trained_len]))


# ----------------------------------------------------------------------------------------------
# Serving arithmetic at long context (exact counts from a K2Config; identities, not measurements)

# bytes per parameter of (routed experts, everything else) in each released storage format
WEIGHT_FORMATS = {
    "bf16": (2.0, 2.0),
    "fp8": (1.0 + 4 / (128 * 128), 1.0 + 4 / (128 * 128)),  # e4m3 + a float32 scale per 128x128 block (K2)
    "int4": (0.5 + 2 / 32, 2.0),  # K2-Thinking: INT4 experts with a bf16 scale per 32, the rest bf16
}


def weight_bytes(config: K2Config, fmt: str = "fp8", active: bool = False) -> float:
    """Bytes of the weights (all of them, or the ones one token reads) stored in `fmt`."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(WEIGHT_FORMATS)}, got {fmt!r}")
    expert_b, other_b = WEIGHT_FORMATS[fmt]
    parts = config.param_breakdown()["active" if active else "total"]
    routed = parts["routed_experts"]
    return routed * expert_b + (sum(parts.values()) - routed) * other_b


def serving_bytes(config: K2Config, context: int, fmt: str = "fp8", scheme: str = "mla", kv_groups=None,
                  cache_bytes_per_number: int = 2) -> dict:
    """One sequence of `context` tokens at batch 1: weights held, KV cache held, and the bytes one decoded
    token must read (its active weights plus the whole cache). Memory-bound decoding cannot run faster
    than bandwidth / decode_bytes tokens per second."""

    cache = kv_cache_bytes(config, scheme, context, bytes_per_number=cache_bytes_per_number, kv_groups=kv_groups)
    return {"weights": weight_bytes(config, fmt), "cache": cache,
            "decode_bytes": weight_bytes(config, fmt, active=True) + cache}
