"""K2Config: the model's hyper-parameters under their Hugging Face `config.json` names.

One dataclass for the whole DeepseekV3 family (Kimi-K2, Moonlight, DeepSeek-V3): its fields, derived
sizes, validation (every field checked by type and range, naming the field) and parameter accounting.
The presets live in presets.py, the conversion from/to HF config dicts in checkpoint/hf_config.py.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .checks import check_bool, check_int, check_real
from .presets import preset_kwargs, preset_names

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
POSITIVE_INT_FIELDS = (
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
    "max_position_embeddings",
)
BOOL_FIELDS = ("norm_topk_prob", "tie_word_embeddings", "attention_bias")
POSITIVE_REAL_FIELDS = ("rms_norm_eps", "routed_scaling_factor", "rope_theta")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


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
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
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
        """ValueError "K2Config.<field>: <rule> (got <value>)" for the first field that breaks its rule.

        Every value is a ValueError, a wrong type included: a config.json holds values, not Python types.
        Booleans are JSON booleans (the string "false" is not false), numbers finite and in range.
        """
        def bad(name, why):
            raise ValueError(f"K2Config.{name}: {why} (got {getattr(self, name)!r})")

        def need(name, why, check, **bounds):
            if not _passes(check, getattr(self, name), **bounds):
                bad(name, why)

        for name in BOOL_FIELDS:
            need(name, "must be true or false (a boolean, not a string or a number)", check_bool)
        for name in POSITIVE_REAL_FIELDS:
            need(name, "must be a finite number > 0", check_real, low=0, low_open=True)
        need("initializer_range", "must be a finite number >= 0", check_real, low=0)
        for name in TOKEN_ID_FIELDS:
            v = getattr(self, name)
            ids = v if isinstance(v, list) and name == "eos_token_id" else [v]
            if v is not None and not all(_passes(check_int, i, low=0) for i in ids):
                bad(name, "must be a non-negative integer or null" + (" (or a list of them)" if name == "eos_token_id" else ""))
        for name in POSITIVE_INT_FIELDS:
            need(name, "must be a positive integer", check_int, low=1)
        for name in ("n_shared_experts", "first_k_dense_replace"):
            need(name, "must be a non-negative integer", check_int, low=0)
        if self.q_lora_rank is not None:
            need("q_lora_rank", "must be a positive integer or None", check_int, low=1)
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

    # ----------------------------------------------------------------- presets and HF conversion
    @classmethod
    def preset(cls, name: str) -> "K2Config":
        """A released model's or a mini's configuration by name (k2mini/presets.py)."""
        return cls(**preset_kwargs(name))

    @staticmethod
    def presets() -> list[str]:
        return preset_names()

    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike) -> "K2Config":
        """Build from a HF `config.json` (a dict, a path to the file, or a checkpoint directory).

        The conversion lives in k2mini/checkpoint/hf_config.py (checkpoint/ is where HF knowledge lives);
        this forward imports it on call, so importing the config never imports the checkpoint package
        (which imports the model, which imports this module).
        """
        from .checkpoint.hf_config import config_from_hf

        return config_from_hf(config, cls)

    def to_hf(self) -> dict:
        """A config.json dict that transformers' DeepseekV3Config (v5) accepts (k2mini/checkpoint/hf_config.py;
        imported on call for the reason given in `from_hf`)."""
        from .checkpoint.hf_config import config_to_hf

        return config_to_hf(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "K2Config":
        return dataclasses.replace(self, **changes)

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


def normalize_rope_scaling(rs: dict) -> dict | None:
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
        if not _passes(check_real, v, low=1):
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
            if not _passes(check_int, v, low=1):
                raise ValueError(f"K2Config.rope_scaling: {k} must be a positive integer (got {v!r})")
        elif k == "truncate":
            if not _passes(check_bool, v):
                raise ValueError(f"K2Config.rope_scaling: {k} must be true or false (got {v!r})")
        elif k != "rope_type" and not _passes(check_real, v, low=0 if k == "factor" else None, low_open=True):
            raise ValueError(f"K2Config.rope_scaling: {k} must be a finite number{' > 0' if k == 'factor' else ''} (got {v!r})")
    return out


def _passes(check, value, **bounds) -> bool:
    """Whether `value` passes a k2mini.checks check; the config words its own errors (see K2Config.validate)."""
    try:
        check(value, "value", **bounds)
    except (TypeError, ValueError):
        return False
    return True
