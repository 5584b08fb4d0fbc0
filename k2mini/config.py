"""K2Config: the model's hyper-parameters under their Hugging Face `config.json` names.

One dataclass for the whole DeepseekV3 family (Kimi-K2, Moonlight, DeepSeek-V3), presets for the
released models and for CPU-sized minis, conversion from/to HF config dicts, and parameter accounting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
)
ROPE_TYPES = ("linear", "dynamic", "yarn")  # rope_scaling types besides "default" (no scaling)


@dataclass
class K2Config:
    vocab_size: int = 260
    hidden_size: int = 64
    intermediate_size: int = 96
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 2
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    n_routed_experts: int = 16
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    q_lora_rank: int | None = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    hidden_act: str = "silu"
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None  # linear / dynamic / yarn parameters (transformers-4 spelling), or None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "kimi_k2"
    quantization_config: dict | None = None  # as read from a checkpoint; informational

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    @property
    def sparsity(self) -> float:
        """Total routed experts over active routed experts (K2: 384 / 8 = 48)."""
        return self.n_routed_experts / self.num_experts_per_tok

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"K2Config.{name}: {why} (got {getattr(self, name)!r})")

        self._validate_types(bad)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
        ):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                bad(name, "must be a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not _is_int(self.q_lora_rank) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer or None")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (rope rotates pairs)")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA needs it equal to num_attention_heads={self.num_attention_heads}")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts // self.n_group < 2:
            bad("n_group", "groups are scored by their top-2 experts, so each needs at least 2 experts")
        if self.topk_group > self.n_group:
            bad("topk_group", f"cannot exceed n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            bad("num_experts_per_tok", "exceeds the experts left in the topk_group kept groups")
        if self.scoring_func != "sigmoid":
            bad("scoring_func", "only 'sigmoid' (K2 / DeepSeek-V3) is supported")
        if self.topk_method != "noaux_tc":
            bad("topk_method", "only 'noaux_tc' (K2 / DeepSeek-V3) is supported")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' is supported")

    def _validate_types(self, bad) -> None:
        """Booleans are JSON booleans (the string "false" is not false), numbers finite and in range."""
        for name in ("norm_topk_prob", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false (a boolean, not a string or a number)")
        for name in ("rms_norm_eps", "routed_scaling_factor", "rope_theta"):
            if not _is_real(getattr(self, name)) or not getattr(self, name) > 0:
                bad(name, "must be a finite number > 0")
        if not _is_real(self.initializer_range) or self.initializer_range < 0:
            bad("initializer_range", "must be a finite number >= 0")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings <= 0:
            bad("max_position_embeddings", "must be a positive integer")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) and name == "eos_token_id" else [v]
            if v is not None and not all(_is_int(i) and i >= 0 for i in ids):
                bad(name, "must be a non-negative integer or null" + (" (or a list of them)" if name == "eos_token_id" else ""))

    # ----------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike) -> "K2Config":
        """Build from a HF `config.json` (a dict, a path to the file, or a checkpoint directory).

        Accepts model_type "kimi_k2" and "deepseek_v3", and both the transformers-4 spelling
        (`rope_theta` + `rope_scaling`) and the transformers-5 one (`rope_parameters`).
        """
        where = "config"
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: no config.json there") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        d = dict(config)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{where}: model_type {model_type!r} is not a DeepseekV3-family model "
                f"(expected one of {SUPPORTED_MODEL_TYPES})"
            )
        archs = d.get("architectures")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(f"{where}: architectures {archs} not supported (expected {SUPPORTED_ARCHITECTURES})")

        rope_theta, rope_scaling = _rope_from_hf(d, where)
        names = {f.name for f in dataclasses.fields(cls)}
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "n_routed_experts",
            "num_experts_per_tok",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        )
        for r in required:
            if r not in d or d[r] is None:
                raise ValueError(f"{where}: required field {r!r} is missing")
        kwargs: dict[str, Any] = {k: d[k] for k in names if k in d and k not in ("rope_theta", "rope_scaling")}
        # DeepSeek-V3 defaults for fields older configs omit
        kwargs.setdefault("first_k_dense_replace", 0)
        kwargs.setdefault("n_shared_experts", 0 if d.get("n_shared_experts") is None else d["n_shared_experts"])
        for k in ("n_group", "topk_group"):
            if kwargs.get(k) is None:
                kwargs[k] = 1
        if kwargs.get("n_shared_experts") is None:
            kwargs["n_shared_experts"] = 0
        if "q_lora_rank" not in d:
            kwargs["q_lora_rank"] = None
        kwargs["rope_theta"] = rope_theta
        kwargs["rope_scaling"] = rope_scaling
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        except TypeError as e:
            raise ValueError(f"{where}: a field has the wrong type ({e})") from None

    def to_hf(self) -> dict:
        """A config.json dict that transformers' DeepseekV3Config (v5) accepts."""
        d = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",  # transformers knows the family by this name
        }
        skip = {"rope_theta", "rope_scaling", "model_type", "quantization_config", "scoring_func", "topk_method"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                d[f.name] = getattr(self, f.name)
        rope = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling)
        d["rope_parameters"] = rope
        d["num_nextn_predict_layers"] = 0
        d["rope_interleave"] = True
        if self.quantization_config is not None:
            d["quantization_config"] = dict(self.quantization_config)
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "K2Config":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> "K2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @staticmethod
    def presets() -> list[str]:
        return sorted(PRESETS)

    # ----------------------------------------------------------------- parameter accounting
    def param_breakdown(self) -> dict[str, dict[str, int]]:
        """Parameters per component, `{"total": {...}, "active": {...}}`.

        Convention (docs/K2_FACTS.md section 1): every tensor of the unquantized model counts, the router's
        correction bias included; "active" is what one token touches: its embedding row and lm_head
        counted whole, all attention, dense layers, and per MoE layer the router, shared experts and
        `num_experts_per_tok` routed experts.
        """
        h, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = h * H * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        o = H * self.v_head_dim * h
        attention = (q + kv + o) * self.num_hidden_layers
        norms = 2 * h * self.num_hidden_layers + h
        n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        dense = 3 * h * self.intermediate_size * n_dense
        expert = 3 * h * self.moe_intermediate_size
        L = self.n_moe_layers
        router = (self.n_routed_experts * h + self.n_routed_experts) * L
        shared = expert * self.n_shared_experts * L
        routed_total = expert * self.n_routed_experts * L
        routed_active = expert * self.num_experts_per_tok * L
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        common = {
            "embedding": embed,
            "lm_head": head,
            "attention": attention,
            "norms": norms,
            "dense_ffn": dense,
            "router": router,
            "shared_experts": shared,
        }
        return {
            "total": {**common, "routed_experts": routed_total},
            "active": {**common, "routed_experts": routed_active},
        }

    def param_counts(self) -> dict[str, int]:
        b = self.param_breakdown()
        return {"total": sum(b["total"].values()), "active": sum(b["active"].values())}


def _normalize_rope_scaling(rs: dict) -> dict | None:
    """The rope scaling dict in k2mini's spelling: `rope_type` plus the keys that type reads.

    Types (as transformers' `modeling_rope_utils` computes them): "default" (None here), "linear"
    (position interpolation: every frequency divided by `factor`), "dynamic" (NTK-aware: the base grows
    with the current sequence length past max_position_embeddings) and "yarn". linear and dynamic
    take only a `factor`; anything else (an mscale, an original length) is refused rather than ignored.
    """
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.pop("type", None)
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    if kind in (None, "default"):
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"K2Config.rope_scaling: rope_type {kind!r} is not supported (choose from default, {', '.join(ROPE_TYPES)})"
        )
    if "factor" not in rs:
        raise ValueError(f"K2Config.rope_scaling: {kind} needs a 'factor'")
    if kind in ("linear", "dynamic"):
        extra = sorted(k for k, v in rs.items() if k != "factor" and v is not None)
        if extra:
            raise ValueError(f"K2Config.rope_scaling: {kind} takes only 'factor' (got also {extra})")
        v = rs["factor"]
        if not _is_real(v) or not v >= 1:
            raise ValueError(f"K2Config.rope_scaling: factor must be a finite number >= 1 for {kind} (got {v!r})")
        return {"rope_type": kind, "factor": v}
    if "original_max_position_embeddings" not in rs:
        raise ValueError("K2Config.rope_scaling: yarn needs 'original_max_position_embeddings'")
    out = {"rope_type": "yarn"}
    for k in YARN_KEYS:
        if k in rs and rs[k] is not None:
            out[k] = rs[k]
    for k, v in out.items():
        if k == "original_max_position_embeddings":
            if not _is_int(v) or v <= 0:
                raise ValueError(f"K2Config.rope_scaling: {k} must be a positive integer (got {v!r})")
        elif k == "truncate":
            if not isinstance(v, bool):
                raise ValueError(f"K2Config.rope_scaling: {k} must be true or false (got {v!r})")
        elif k != "rope_type" and (not _is_real(v) or (k == "factor" and not v > 0)):
            raise ValueError(f"K2Config.rope_scaling: {k} must be a finite number{' > 0' if k == 'factor' else ''} (got {v!r})")
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    """A finite int or float (not a bool, not a numeric string)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rope_from_hf(d: dict, where: str) -> tuple[float, dict | None]:
    params = d.get("rope_parameters")
    if params and isinstance(params, dict) and "rope_theta" in params:  # transformers 5
        theta = params["rope_theta"]
        scaling = params
    else:  # transformers 4
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"{where}: rope_scaling must be a dict or null")
    try:
        scaling = _normalize_rope_scaling(scaling) if scaling else None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not _is_real(theta) or not theta > 0:
        raise ValueError(f"{where}: K2Config.rope_theta: must be a finite number > 0 (got {theta!r})")
    return float(theta), scaling


# Released models: values of their public config.json files (docs/K2_FACTS.md section 1).
# Kimi-K2 and DeepSeek-V3 publish fp8 weights with a scale per 128x128 block (save_pretrained(fp8=True) too).
K2_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
}
_K2 = dict(
    vocab_size=163840,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    first_k_dense_replace=1,
    num_attention_heads=64,
    n_routed_experts=384,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rope_theta=50000.0,
    rope_scaling=dict(
        rope_type="yarn",
        factor=32.0,
        original_max_position_embeddings=4096,
        beta_fast=1.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    bos_token_id=163584,
    eos_token_id=163585,
    model_type="kimi_k2",
    quantization_config=dict(K2_QUANTIZATION_CONFIG),
)

# CPU-sized minis with K2's proportions: MLA with a latent, sigmoid routing over fine-grained experts
# plus one shared expert, one dense first layer, no yarn (short contexts). Byte-level vocabulary (260).
_MINI = dict(
    vocab_size=260,
    hidden_size=256,
    intermediate_size=320,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    n_routed_experts=64,
    num_experts_per_tok=4,
    n_shared_experts=1,
    routed_scaling_factor=2.827,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    rope_theta=50000.0,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    model_type="kimi_k2",
)

PRESETS: dict[str, dict] = {
    "kimi-k2": _K2,
    "kimi-k2-instruct-0905": {
        **_K2,
        "rope_scaling": {**_K2["rope_scaling"], "factor": 64.0},
        "max_position_embeddings": 262144,
    },
    # K2.5 / K2.6 (text model): K2's sizes, yarn factor 64 over the same 4,096 original tokens (256K)
    "kimi-k2.5": {
        **_K2,
        "rope_scaling": {**_K2["rope_scaling"], "factor": 64.0},
        "max_position_embeddings": 262144,
    },
    "moonlight-16b-a3b": dict(
        vocab_size=163840,
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        norm_topk_prob=True,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=50000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=163584,
        eos_token_id=163585,
        model_type="deepseek_v3",
    ),
    "deepseek-v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        num_attention_heads=128,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_shared_experts=1,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=10000.0,
        rope_scaling=dict(
            rope_type="yarn",
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        model_type="deepseek_v3",
        quantization_config=dict(K2_QUANTIZATION_CONFIG),
    ),
    # sparsity 16 (64 experts, 4 active + 1 shared): the default mini for training notebooks
    "k2-mini": _MINI,
    # K2's own sparsity 48 (192 experts, 4 active) at the same active size
    "k2-mini-s48": {**_MINI, "n_routed_experts": 192},
    # the smallest useful one: unit tests and CI-scale notebooks
    "k2-micro": dict(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_shared_experts=1,
        routed_scaling_factor=2.827,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_theta=50000.0,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        model_type="kimi_k2",
    ),
}
