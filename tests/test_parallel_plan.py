"""The seam between training and k2mini.parallel: train() asks a plan (plan_of(model) unless given one)
for the module the forward runs through, the reductions over ranks, the gradient norm and whether
checkpoints can be written. An expert-parallel model's plan hands DDP only its replicated part."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import k2mini
from k2mini import K2Config, K2ForCausalLM
from k2mini.parallel import DataParallel, ExpertParallel, Replicated, plan_of, replicate, shard_experts
from lab_runs import TEXT

SETTINGS = dict(batch_size=2, seq_len=16, eval_every=0, progress=False)


@pytest.fixture(scope="module")
def data():
    return k2mini.make_dataset(k2mini.Corpus("text", [TEXT], ["text.txt"]), val_fraction=0.1, block_size=256)


@pytest.fixture
def one_process_group(tmp_path):
    """torch.distributed in this process, a world of one (gloo)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def micro(seed=0):
    torch.manual_seed(seed)
    return K2ForCausalLM(K2Config.preset("k2-micro"))


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3)


class RecordingPlan(DataParallel):
    """A DataParallel that records what train() asks of it."""

    def __init__(self, refusal=None):
        super().__init__()
        self.calls, self.checkpoint_refusal = [], refusal

    def wrap(self, model):
        self.calls.append("wrap")
        return super().wrap(model)

    def all_reduce(self, t, op="sum"):
        self.calls.append(f"all_reduce {op}")
        return super().all_reduce(t, op)

    def clip_grad_norm_(self, model, max_norm):
        self.calls.append(f"clip {max_norm}")
        return super().clip_grad_norm_(model, max_norm)


def test_a_plain_model_trains_data_parallel():
    model = micro()
    plan = plan_of(model)
    assert type(plan) is DataParallel and (plan.rank, plan.world) == (0, 1)
    assert plan.wrap(model) is model and plan.checkpoint_refusal is None


def test_train_asks_the_plan_it_is_given_and_only_it(data, tmp_path):
    plan = RecordingPlan()
    h = k2mini.train((m := micro()), data, adamw(m), 2, grad_clip=0.5, parallel=plan, **SETTINGS)
    # per step: the loss (sum), the gradient norm, max logits (max), router loads (sum)
    assert plan.calls == ["wrap"] + ["all_reduce sum", "clip 0.5", "all_reduce max", "all_reduce sum"] * 2
    default = k2mini.train((m := micro()), data, adamw(m), 2, grad_clip=0.5, **SETTINGS)
    assert h["train_loss"].tolist() == default["train_loss"].tolist()
    assert h["grad_norm"].tolist() == default["grad_norm"].tolist()
    refusing = RecordingPlan(refusal="this layout keeps no checkpoints")
    with pytest.raises(ValueError, match="this layout keeps no checkpoints"):
        k2mini.train((m := micro()), data, adamw(m), 1, checkpoint_dir=tmp_path / "ck", parallel=refusing, **SETTINGS)
    assert not (tmp_path / "ck").exists()
    k2mini.train((m := micro()), data, adamw(m), 1, checkpoint_dir=tmp_path / "ck", parallel=RecordingPlan(), **SETTINGS)
    assert (tmp_path / "ck" / "last.pt").exists()


def test_an_expert_parallel_model_gets_its_plan(one_process_group, data, tmp_path):
    model = shard_experts(micro(), 1)
    plan = plan_of(model)
    assert isinstance(plan, ExpertParallel) and plan.groups is model.expert_parallel
    with pytest.raises(ValueError, match="checkpoints of an expert-parallel model"):
        k2mini.train(model, data, adamw(model), 1, checkpoint_dir=tmp_path / "ck", **SETTINGS)
    # its gradient norm covers the experts: at degree 1 it is the whole model's, as one process measures it
    model(torch.randint(0, model.config.vocab_size, (2, 16))).logits.square().mean().backward()
    expert_grads = [p.grad for layer in model.moe_layers() for p in layer.mlp.experts.parameters()]
    assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads)
    assert plan.clip_grad_norm_(model, None) == pytest.approx(DataParallel().clip_grad_norm_(model, None), rel=1e-5)


def test_replicate_hands_ddp_only_what_every_rank_holds_alike(one_process_group):
    ref = micro()
    model = shard_experts(copy.deepcopy(ref), 1)
    net = replicate(model)
    assert isinstance(net, DistributedDataParallel) and isinstance(net.module, Replicated)
    experts = {id(p) for layer in model.moe_layers() for p in layer.mlp.experts.parameters()}
    wrapped = {id(p) for p in net.module.parameters()}
    assert len(experts) == 3 * len(model.moe_layers()) > 0
    assert wrapped == {id(p) for p in model.parameters()} - experts  # the model's own tensors, experts left out
    assert {id(b) for b in net.module.buffers()} == {id(b) for b in model.buffers()}  # (the experts have none)
    # the forward through it is the whole model's, and backward fills the model's own gradients
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    out, ref_out = net(ids, telemetry=True), ref(ids, telemetry=True)
    torch.testing.assert_close(out.logits, ref_out.logits)
    out.logits.square().mean().backward()
    ref_out.logits.square().mean().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, msg=name)
