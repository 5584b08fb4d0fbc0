"""Sparse activation inside checkpoints: which experts fire, how evenly, with which others, for which
text, and what the routers and their correction biases look like, without holding the model in memory.

    router_summary(source)                  static: routers + biases from the weights alone
    stream_activations(source, token_ids)   dynamic: a layer-by-layer forward pass, bounded memory
    load_tokenizer(source)                  the checkpoint's own tokenizer (tiktoken / tokenizers / bytes)
    save_results / load_results             one JSON file for notebooks and `python -m k2mini.analysis`
"""

from .params import active_share, component_of, layout_bytes
from .result import StreamResult
from .results_file import load_results, save_results
from .source import parse_layers, resolve_layers
from .router_weights import router_stats, router_summary
from .routing_stats import (
    centred,
    coactivation_counts,
    coactivation_lift,
    cosine_matrix,
    domain_preference,
    expert_counts,
    hottest_share,
    js_divergence,
    load_entropy,
    load_share,
    mean_weight,
    unused_experts,
    weight_entropy,
    weight_sums,
)
from .stream import stream_activations
from .checkpoint_tokenizer import Tokenizer, TokenizerError, encode_batch, load_tokenizer

__all__ = [
    "router_summary",
    "router_stats",
    "stream_activations",
    "StreamResult",
    "load_tokenizer",
    "encode_batch",
    "Tokenizer",
    "TokenizerError",
    "save_results",
    "load_results",
    "active_share",
    "layout_bytes",
    "component_of",
    "resolve_layers",
    "parse_layers",
    "expert_counts",
    "weight_sums",
    "coactivation_counts",
    "coactivation_lift",
    "mean_weight",
    "weight_entropy",
    "load_entropy",
    "load_share",
    "hottest_share",
    "unused_experts",
    "domain_preference",
    "js_divergence",
    "centred",
    "cosine_matrix",
]
