"""What notebook 06 runs: an expert-parallel forward and backward on spawned gloo processes, recorded
rank by rank, and the arithmetic of stragglers and device-limited routing.

`dispatch_record(world, degree)` starts `python -m k2mini.lab.expert_parallel` (which forks `world`
processes) under a timeout, so a notebook never waits on a hung collective; each rank runs one batch
through the single-process model and through its expert-parallel copy (same weights) and records
what its all-to-alls moved.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from ..config import K2Config
from ..model import K2ForCausalLM
from ..parallel import replicate, shard_experts
from .experiments import RunSpec


def straggler_factor(load, degree: int):
    """The slowest rank's expert work over the mean rank's: load (..., E) token-slots per expert, experts
    numbered rank-major over `degree` ranks. Never more than 1 + MaxVio (a rank's sum of E/degree
    loads is at most E/degree times the largest), and 1 when every rank gets the same slots."""
    per_rank = rearrange(torch.as_tensor(np.asarray(load), dtype=torch.float64), "... (r e) -> ... r e", r=degree).sum(-1)
    return (per_rank.amax(-1) / per_rank.mean(-1).clamp_min(1e-12)).numpy()


def balancing_specs(seed: int, methods, steps: int = 200):
    """Notebook 02's comparison runs (its ci settings) for one seed, one per balancing method: the same
    specs, so a run cache that notebook 02 filled serves them."""

    base = RunSpec(optimizer="adamw", lr=3e-3, steps=steps, preset="k2-micro", config={"num_hidden_layers": 3},
                   batch_size=16, seq_len=64, eval_every=50, eval_batches=16,
                   train={"schedule": "cosine", "warmup_steps": 20})
    return [base.replace(seed=seed, train={"balancing": m, "bias_update_speed": 1e-2 if m.startswith("loss_free") else 0.0},
                         label=m) for m in methods]


def straggler_table(runs, degrees, last: int = 50):
    """One row per run: seed, balancing method, and per degree the straggler factor averaged over the
    last `last` logged steps and the MoE layers (columns named by the degree)."""
    import pandas as pd

    rows = []
    for run in runs:
        loads = run.loads[-last:]  # (steps, MoE layers, E) token-slots per step
        row = {"seed": run.spec.seed, "balancing": run.spec.get("balancing")}
        row.update({d: float(straggler_factor(loads, d).mean()) for d in degrees})
        rows.append(row)
    return pd.DataFrame(rows)


def distinct_groups(indices: torch.Tensor, n_experts: int, n_groups: int) -> torch.Tensor:
    """How many of `n_groups` equal blocks of experts (nodes) each token's chosen experts touch: (N,)."""
    group = indices // (n_experts // n_groups)  # (N, k)
    hit = torch.zeros(indices.shape[0], n_groups, dtype=torch.bool).scatter_(1, group, True)
    return hit.sum(1)


def _rank(rank: int, world: int, degree: int, out_dir: str, seed: int, batch: int, seq: int, preset: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        torch.manual_seed(seed)
        model = K2ForCausalLM(K2Config.preset(preset))
        ids = torch.randint(0, model.config.vocab_size, (batch * world, seq))
        ref = copy.deepcopy(model)
        logits = ref(ids).logits
        F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        mine = slice(rank * batch, (rank + 1) * batch)
        shard_experts(model, degree)

        net = replicate(model)  # DDP over the replicated part: each rank holds other experts
        out = net(ids[mine], telemetry=True)
        F.cross_entropy(out.logits.flatten(0, 1), ids[mine].roll(-1, 1).flatten()).backward()
        g, refs = model.expert_parallel, dict(ref.named_parameters())
        grad_err = 0.0
        for name, p in model.named_parameters():
            r = refs[name].grad
            if p.shape != r.shape:
                r = r[g.first:g.first + g.n_local]
            grad_err = max(grad_err, float((p.grad - r).abs().max() / r.abs().max().clamp_min(1e-12)))
        record = {
            "rank": rank, "first": g.first, "n_local": g.n_local, "tokens": ids[mine].numel(),
            "logit_err": float((out.logits - logits[mine]).detach().abs().max() / logits.detach().abs().max()),
            "grad_err": grad_err,
            "slots": {rec.layer: rec.load.clone() for rec in out.telemetry.routers},  # (E,) slots this rank sent
            "sent": {l.index: dict(l.mlp.experts.traffic.sent) for l in model.moe_layers()},
            "received": {l.index: dict(l.mlp.experts.traffic.received) for l in model.moe_layers()},
        }
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def dispatch_record(world: int = 2, degree: int | None = None, seed: int = 0, batch: int = 4, seq: int = 32,
                    preset: str = "k2-micro", timeout: float = 120) -> list[dict]:
    """One step (forward + backward) of the expert-parallel `preset` on `world` processes, batch x seq
    tokens each; per rank: its experts, the token-slots it sent to every expert per MoE layer, the bytes
    its all-to-alls counted, and its largest logit and gradient difference to one process (relative)."""
    degree = world if degree is None else degree
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "k2mini.lab.expert_parallel", str(world), str(degree), out, str(seed), str(batch),
               str(seq), preset]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the expert-parallel processes failed:\n{done.stderr[-3000:]}")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def plot_dispatch(ranks: list[dict], layer: int, ax=None, title=None):
    """Token-slots each rank's tokens (rows) sent to each expert (columns) in MoE layer `layer`. Black
    lines separate the experts of different ranks; orange boxes are the slots that stay home (a rank's
    tokens routed to its own experts); everything else crosses the all-to-all."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    slots = np.stack([r["slots"][layer].numpy() for r in ranks])  # (world, E)
    n_local, E = ranks[0]["n_local"], slots.shape[1]
    ax = ax or plt.subplots(figsize=(9, 0.8 + 0.5 * len(ranks)))[1]
    im = ax.imshow(slots, aspect="auto", cmap="Blues")
    for boundary in range(n_local, E, n_local):
        ax.axvline(boundary - 0.5, color="black", lw=1.5)
    for r in ranks:
        ax.add_patch(Rectangle((r["first"] - 0.5, r["rank"] - 0.5), n_local, 1, fill=False, edgecolor="tab:orange", lw=2.5))
    for (i, j), v in np.ndenumerate(slots):
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7, color="white" if v > slots.max() / 2 else "black")
    ax.set_yticks(range(len(ranks)), [f"rank {r['rank']}'s tokens" for r in ranks])
    ax.set_xticks(range(E))
    ax.set_xlabel("routed expert (black lines: where the rank holding the experts changes)")
    ax.set_title(title or f"token-slots sent to each expert, MoE layer {layer} (orange: stays home)")
    plt.colorbar(im, ax=ax, fraction=0.03)
    return ax


if __name__ == "__main__":
    import torch.multiprocessing as mp

    w, d, o, s, b, t, p = sys.argv[1:8]
    # fork: the children share this fresh process's imports instead of importing torch again
    mp.start_processes(_rank, args=(int(w), int(d), o, int(s), int(b), int(t), p), nprocs=int(w), start_method="fork")
