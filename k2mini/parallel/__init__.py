"""Expert parallelism in miniature: each MoE layer's routed experts sharded over processes.

`shard_experts(model, degree)` turns a K2ForCausalLM (same weights on every rank) into an expert-parallel
one: every rank keeps E/degree whole experts and the rest of the model replicated. Tokens travel in
two all-to-alls per MoE layer (dispatch to the experts' owners, combine back), forward and backward;
`traffic` gives the bytes those move, for a measured routing or for a config at any scale.

One idea per file: groups.py (who holds which experts, and the checks), all_to_all.py (the
differentiable exchange that counts its bytes), experts.py (the expert-parallel layer), shard.py
(converting a model), traffic.py (the accounting).
"""

from .all_to_all import Traffic, all_to_all
from .experts import ExpertParallelExperts
from .groups import ExpertParallelGroups, check_degree, expert_parallel_groups
from .shard import shard_experts
from .traffic import expected_traffic, traffic_from_slots

__all__ = [
    "ExpertParallelExperts",
    "ExpertParallelGroups",
    "Traffic",
    "all_to_all",
    "check_degree",
    "expected_traffic",
    "expert_parallel_groups",
    "shard_experts",
    "traffic_from_slots",
]
