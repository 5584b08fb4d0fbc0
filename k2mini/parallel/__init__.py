"""Expert parallelism in miniature: each MoE layer's routed experts sharded over processes.

`shard_experts(model, degree)` turns a K2ForCausalLM (same weights on every rank) into an expert-parallel
one: every rank keeps E/degree whole experts and the rest of the model replicated. Tokens travel in
two all-to-alls per MoE layer (dispatch to the experts' owners, combine back), forward and backward;
`traffic` gives the bytes those move, for a measured routing or for a config at any scale.

Training reaches all of this through one seam, a plan (plan.py): `plan_of(model)` is `ExpertParallel`
for a sharded model, else `DataParallel`; `k2mini.train` asks it for the module the forward runs
through, the reductions over ranks, the gradient norm and whether checkpoints can be written.

One idea per file: groups.py (who holds which experts, and the checks), all_to_all.py (the
differentiable exchange that counts its bytes), experts.py (the expert-parallel layer), shard.py
(converting a model), replicate.py (DDP over the replicated part only), clip.py (the gradient norm over
every rank's experts), plan.py (the seam), traffic.py (the accounting).
"""

from .all_to_all import Traffic, all_to_all
from .experts import ExpertParallelExperts
from .groups import ExpertParallelGroups, check_degree, expert_parallel_groups
from .plan import DataParallel, ExpertParallel, ParallelPlan, plan_of
from .replicate import Replicated, replicate
from .shard import shard_experts
from .traffic import expected_traffic, traffic_from_slots

__all__ = [
    "DataParallel",
    "ExpertParallel",
    "ExpertParallelExperts",
    "ExpertParallelGroups",
    "ParallelPlan",
    "Replicated",
    "Traffic",
    "all_to_all",
    "check_degree",
    "expected_traffic",
    "expert_parallel_groups",
    "plan_of",
    "replicate",
    "shard_experts",
    "traffic_from_slots",
]
