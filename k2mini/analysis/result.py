"""StreamResult: what a streaming pass measured, per MoE layer and per expert, as tensors and tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import routing_stats


@dataclass
class StreamResult:
    """Routing measured on a batch of B x T tokens. L = number of MoE layers recorded, E = experts.

    counts (L, E) int64: token-slots per expert. weight_sum (L, E) float64: sum of the mixing weights
    each expert received (routed_scaling_factor included, as the model applies them). coactivation
    (L, E, E) int64: tokens that chose both experts (diagonal = counts). weight_entropy (L,): mean over
    tokens of the entropy (nats) of each token's normalized weights over its k experts.
    token_param_share (B, T): the share of the model's parameters each token touched (docs/K2_FACTS.md section 1
    convention: embedding and lm_head counted whole, plus what it routed to). hidden (B, T, hidden):
    the residual stream after the last layer computed. max_logits (layers computed, heads).
    """

    source: str
    config: dict  # the checkpoint's config.json as K2Config.to_hf() writes it
    layers: list[int]
    top_k: int
    n_tokens: int
    counts: torch.Tensor
    weight_sum: torch.Tensor
    coactivation: torch.Tensor
    weight_entropy: torch.Tensor
    token_param_share: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    max_logits: torch.Tensor | None = None
    labels: list[str] | None = None  # one per batch row, or None
    counts_by_label: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> (L, E)
    experts_loaded: list[int] = field(default_factory=list)  # routed experts read, per MoE layer
    bytes_read: int = 0
    checkpoint_bytes: int = 0
    resumed_at: int | None = None  # the layer an interrupted run was resumed at, if it was

    @property
    def n_experts(self) -> int:
        return int(self.counts.shape[-1])

    @property
    def mean_weight(self) -> torch.Tensor:
        return routing_stats.mean_weight(self.weight_sum, self.counts)

    @property
    def load_share(self) -> torch.Tensor:
        return routing_stats.load_share(self.counts)

    def layer_frame(self):
        """pandas DataFrame, one row per MoE layer: how evenly its experts were used."""
        import pandas as pd

        E, k = self.n_experts, self.top_k
        hottest = routing_stats.hottest_share(self.counts)
        df = pd.DataFrame(
            {
                "layer": self.layers,
                "hottest_expert": self.counts.argmax(-1).tolist(),
                "hottest_share": hottest.tolist(),
                "hottest_over_uniform": (hottest * E).tolist(),
                "unused_experts": routing_stats.unused_experts(self.counts).tolist(),
                "load_entropy": routing_stats.load_entropy(self.counts).tolist(),
                "weight_entropy": (self.weight_entropy / math.log(k) if k > 1 else self.weight_entropy).tolist(),
                "experts_loaded": self.experts_loaded or [None] * len(self.layers),
            }
        ).set_index("layer")
        df.attrs.update(uniform_share=1 / E, n_tokens=self.n_tokens, top_k=k)
        return df

    def expert_frame(self):
        """pandas DataFrame, one row per (layer, expert): count, share, mean weight, counts per label."""
        import pandas as pd

        L, E = self.counts.shape
        data = {
            "layer": [l for l in self.layers for _ in range(E)],
            "expert": list(range(E)) * L,
            "count": self.counts.reshape(-1).tolist(),
            "share": self.load_share.reshape(-1).tolist(),
            "mean_weight": self.mean_weight.reshape(-1).tolist(),
        }
        for label, c in self.counts_by_label.items():
            data[f"count_{label}"] = c.reshape(-1).tolist()
        return pd.DataFrame(data).set_index(["layer", "expert"])

    # ----------------------------------------------------------------- JSON
    def to_dict(self, hidden: bool = False) -> dict:
        """Plain lists and numbers (json.dump-able). The hidden states only when asked (they are large)."""

        def lst(t):
            return None if t is None else t.tolist()

        return {
            "source": self.source,
            "config": self.config,
            "layers": list(self.layers),
            "top_k": self.top_k,
            "n_tokens": self.n_tokens,
            "counts": lst(self.counts),
            "weight_sum": lst(self.weight_sum),
            "coactivation": lst(self.coactivation),
            "weight_entropy": lst(self.weight_entropy),
            "token_param_share": lst(self.token_param_share),
            "max_logits": lst(self.max_logits),
            "hidden": lst(self.hidden) if hidden else None,
            "labels": self.labels,
            "counts_by_label": {k: lst(v) for k, v in self.counts_by_label.items()},
            "experts_loaded": list(self.experts_loaded),
            "bytes_read": self.bytes_read,
            "checkpoint_bytes": self.checkpoint_bytes,
            "resumed_at": self.resumed_at,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "StreamResult":
        def t(x, dtype):
            return None if x is None else torch.tensor(x, dtype=dtype)

        return cls(
            source=d["source"],
            config=d["config"],
            layers=list(d["layers"]),
            top_k=int(d["top_k"]),
            n_tokens=int(d["n_tokens"]),
            counts=t(d["counts"], torch.int64),
            weight_sum=t(d["weight_sum"], torch.float64),
            coactivation=t(d["coactivation"], torch.int64),
            weight_entropy=t(d["weight_entropy"], torch.float64),
            token_param_share=t(d.get("token_param_share"), torch.float64),
            hidden=t(d.get("hidden"), torch.float32),
            max_logits=t(d.get("max_logits"), torch.float32),
            labels=d.get("labels"),
            counts_by_label={k: t(v, torch.int64) for k, v in (d.get("counts_by_label") or {}).items()},
            experts_loaded=list(d.get("experts_loaded") or []),
            bytes_read=int(d.get("bytes_read", 0)),
            checkpoint_bytes=int(d.get("checkpoint_bytes", 0)),
            resumed_at=d.get("resumed_at"),
        )

    def __repr__(self) -> str:
        return (
            f"StreamResult({self.source!r}, {self.n_tokens} tokens, MoE layers {self.layers}, "
            f"{self.n_experts} experts, top-{self.top_k})"
        )
