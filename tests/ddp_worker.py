"""Run by tests/test_train_ddp.py under torchrun: a few training steps, results saved by rank 0."""

import sys

import torch
import torch.distributed as dist

import k2mini
from k2mini import K2Config, K2ForCausalLM
from k2mini.training import train

SEED = 2  # initial weights: the smallest routing gap of either run is 2e-5 (seed 0: 4e-6, a near-tie; see the test)


def record_routing_margins(margins: list):
    """Wrap the router's choice to record, per call, the smallest gap between a token's k-th and (k+1)-th
    biased score: the margin by which float rounding would have to move a score to change a choice."""
    real = k2mini.moe.choose_experts

    def choose(scores, correction_bias, top_k, *args, **kwargs):
        choice = (scores.detach() + correction_bias).sort(dim=-1, descending=True).values
        margins.append((choice[:, top_k - 1] - choice[:, top_k]).min().item())
        return real(scores, correction_bias, top_k, *args, **kwargs)

    k2mini.moe.choose_experts = choose


def run(corpus_path: str, out_path: str, kind: str):
    distributed = "--single" not in sys.argv
    margins: list[float] = []
    record_routing_margins(margins)
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(SEED)
    model = K2ForCausalLM(K2Config.preset("k2-micro"))
    data = k2mini.make_dataset(k2mini.load_corpus(corpus_path), val_fraction=0.1, block_size=256)
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        from k2mini.optim import build_optimizer

        opt = build_optimizer(model, kind, lr=3e-3, tau=0.5)
    h = train(model, data, opt, 4, batch_size=4, seq_len=32, eval_every=2, eval_batches=2,
              balancing="loss_free", bias_update_speed=0.01, progress=False)
    if not distributed or dist.get_rank() == 0:
        torch.save({"loss": h["train_loss"].tolist(), "val": h["val_loss"].dropna().tolist(),
                    "state": model.state_dict(),
                    "routing_margin": min(margins)}, out_path)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3])
