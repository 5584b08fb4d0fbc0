"""Run by tests/test_model.py in a child process (an abort then fails the test instead of killing pytest):
compile_layers() at 1 and 2 threads, then training-mode logits and gradients, a no_grad forward, generate
and train() with evaluation, each against an eager twin. Prints one JSON line per thread count."""

import json
import sys

import torch

import k2mini
from k2mini import K2Config, K2ForCausalLM
from k2mini.compile_guard import CompileUnsafeError
from k2mini.training import train

TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3


def twins(seed: int):
    torch.manual_seed(seed)
    eager = K2ForCausalLM(K2Config.preset("k2-micro"))
    compiled = K2ForCausalLM(K2Config.preset("k2-micro"))
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def check(threads: int, data) -> dict:
    torch.set_num_threads(threads)
    eager, compiled = twins(8)
    try:
        compiled.compile_layers()
    except CompileUnsafeError as e:
        return {"threads": threads, "refused": str(e)}
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(9))
    res = {"threads": threads}
    outs = []
    for model in (eager.train(), compiled.train()):
        out = model(ids, telemetry=True)
        out.logits.logsumexp(-1).mean().backward()
        outs.append((out.logits.detach(), out.telemetry.max_logits.detach(), model.moe_layers()[0].mlp.gate.weight.grad))
    (a, ma, ga), (b, mb, gb) = outs
    res["logits"] = float((a - b).abs().max())
    res["max_logits"] = float(((ma - mb).abs() / mb.abs().clamp_min(1e-5)).max())
    res["grads"] = float((ga - gb).abs().max() / ga.abs().max())
    with torch.no_grad():
        res["no_grad_logits"] = float((eager(ids).logits - compiled(ids).logits).abs().max())
    res["generate_equal"] = bool(torch.equal(eager.generate(ids[:, :4], 8), compiled.generate(ids[:, :4], 8)))
    histories = []
    for i, model in enumerate(twins(3)):
        if i:
            model.compile_layers()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        h = train(model, data, opt, 4, batch_size=2, seq_len=16, eval_every=2, eval_batches=2, progress=False)
        histories.append((h["train_loss"].to_numpy(), h["val_loss"].dropna().to_numpy()))
    (la, va), (lb, vb) = histories
    res["train_losses"] = float(abs(la - lb).max())
    res["val_losses"] = float(abs(va - vb).max())
    res["evaluations"] = len(vb)
    return res


if __name__ == "__main__":
    data = k2mini.make_dataset(k2mini.load_corpus(sys.argv[1]), val_fraction=0.1, block_size=256)
    for threads in (1, 2):
        print(json.dumps(check(threads, data)), flush=True)
