"""Run by tests/test_train_ddp.py under torchrun: a few training steps, results saved by rank 0."""

import sys

import torch
import torch.distributed as dist

import k2mini
from k2mini import K2Config, K2ForCausalLM
from k2mini.training import train


def run(corpus_path: str, out_path: str, kind: str):
    distributed = "--single" not in sys.argv
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
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
                    "state": model.state_dict()}, out_path)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3])
