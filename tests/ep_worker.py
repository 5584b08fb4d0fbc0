"""Run by tests/test_parallel_experts.py and tests/test_parallel_train.py.

`python ep_worker.py exact WORLD DEGREE OUT_DIR` spawns WORLD gloo processes; each compares the
expert-parallel model with the single-process one on the same weights and saves what it measured to
OUT_DIR/rank{r}.pt. `python ep_worker.py train WORLD DEGREE OUT_DIR CORPUS` trains a few steps with
MuonClip, expert-parallel (WORLD 1: one process, no torch.distributed), and saves the history; under
torchrun each process runs one rank."""

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import k2mini
from k2mini import K2Config, K2ForCausalLM
from k2mini.moe import Routing, grouped_experts
from k2mini.parallel import replicate, shard_experts, traffic_from_slots

BATCH, SEQ = 4, 16


def max_err(a, b):
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def exactness(rank, world, degree):
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("k2-micro"))
    for layer in model.moe_layers():  # a non-zero bias: choices differ from plain top-k
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    ids = torch.randint(0, model.config.vocab_size, (BATCH * world // 2, SEQ))
    ref = copy.deepcopy(model)
    logits = ref(ids).logits
    F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()  # the mean over all ranks' tokens

    mine = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    shard_experts(model, degree)
    net = replicate(model)  # DDP over the replicated part: each rank holds other experts
    out = net(ids[mine], telemetry=True)
    F.cross_entropy(out.logits.flatten(0, 1), ids[mine].roll(-1, 1).flatten()).backward()

    g = model.expert_parallel
    ref_params = dict(ref.named_parameters())
    grad_err, shapes = {}, {}
    for name, p in model.named_parameters():
        r = ref_params[name]
        if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            part = slice(g.first, g.first + g.n_local)
            r_w, r_g = r.detach()[part], r.grad[part]
            shapes[name] = (tuple(p.shape), tuple(r.shape))
        else:
            r_w, r_g = r.detach(), r.grad
        assert torch.equal(p.detach(), r_w), name  # the same weights
        grad_err[name] = max_err(p.grad, r_g) / max(float(r_g.abs().max()), 1e-12)
    traffic = {layer.index: (dict(layer.mlp.experts.traffic.sent), dict(layer.mlp.experts.traffic.received))
               for layer in model.moe_layers()}
    # the exact accounting from the routing alone: slots[a, b] from every rank's indices
    slots = {}
    for rec in out.telemetry.routers:
        owner = torch.bincount(rec.indices.reshape(-1) // g.n_local, minlength=g.degree)
        everyone = [torch.zeros_like(owner) for _ in range(world)]
        dist.all_gather(everyone, owner)
        slots[rec.layer] = torch.stack(everyone)
    return {"logit_err": max_err(out.logits, logits[mine]), "logit_scale": float(logits.detach().abs().max()),
            "grad_err": grad_err, "shapes": shapes, "traffic": traffic, "slots": slots,
            "first": g.first, "n_local": g.n_local}


def balanced_traffic(degree):
    """Routing built by hand so that every rank sends every rank of its group the same number of slots."""
    torch.manual_seed(1)
    model = K2ForCausalLM(K2Config.preset("k2-micro"))
    moe = model.moe_layers()[0].mlp.experts
    full_stack = [p.detach().clone() for p in (moe.gate_proj, moe.up_proj, moe.down_proj)]
    shard_experts(model, degree)
    experts = model.moe_layers()[0].mlp.experts
    E, k, N = experts.n_experts, 2, 8 * degree
    indices = (torch.arange(N)[:, None] * k + torch.arange(k)) % E  # token n -> experts nk, nk+1 (mod E)
    weights = torch.rand(N, k, requires_grad=True)
    x = torch.randn(N, model.config.hidden_size, requires_grad=True)
    experts(x, Routing(indices, weights, None)).sum().backward()
    result = {"balanced_sent": dict(experts.traffic.sent), "balanced_received": dict(experts.traffic.received),
              "balanced_tokens": N, "weights_grad": weights.grad is not None and x.grad is not None}
    # every token to the first rank's experts: the others receive nothing and must still take part
    full = full_stack  # (gate, up, down) of the same layer before sharding
    indices = torch.randint(0, experts.groups.n_local, (N, k))
    y = experts(x, Routing(indices, weights, None))
    result["skewed_err"] = max_err(y, grouped_experts(x, indices, weights, *full))
    y.sum().backward()
    return result


def bad_settings(world):
    model = K2ForCausalLM(K2Config.preset("k2-micro"))
    msgs = {}
    for label, degree in (("too_large", 2 * world), ("not_dividing_E", 3)):
        try:
            shard_experts(model, degree)
        except ValueError as e:
            msgs[label] = str(e)
    return msgs


def train_run(corpus, degree):
    from k2mini.optim import build_optimizer

    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("k2-micro"))
    if degree:
        shard_experts(model, degree)
    data = k2mini.make_dataset(k2mini.load_corpus(corpus), val_fraction=0.1, block_size=256)
    opt = build_optimizer(model, "muonclip", lr=3e-3, tau=0.5)
    h = k2mini.train(model, data, opt, 4, batch_size=4, seq_len=32, eval_every=2, eval_batches=2,
                     balancing="loss_free", bias_update_speed=0.01, progress=False)
    return {"loss": h["train_loss"].tolist(), "val": h["val_loss"].dropna().tolist(), "grad_norm": h["grad_norm"].tolist(),
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "first": model.expert_parallel.first if degree else 0}


def run(rank, world, degree, out_dir, mode="exact", corpus=None):
    torch.set_num_threads(1)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: rank and rendezvous from its environment
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        if mode == "train":
            result = train_run(corpus, degree)
        else:
            result = exactness(rank, world, degree)
            result.update(balanced_traffic(degree))
            result["bad"] = bad_settings(world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, world, degree, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    corpus = sys.argv[5] if len(sys.argv) > 5 else None
    if world == 1:
        torch.save(train_run(corpus, None), os.path.join(out_dir, "single.pt"))
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        run(int(os.environ["RANK"]), world, degree, out_dir, mode, corpus)
    else:
        # fork: the children share the parent's imports (torch, k2mini) instead of importing them again
        mp.start_processes(run, args=(world, degree, out_dir, mode, corpus), nprocs=world, start_method="fork")
