"""Muon step and batched Newton-Schulz: k2mini against torch.optim.Muon and a per-expert loop.

One process, float32 parameters, 2 threads, the Muon parameters of `K2Config.preset("k2-mini")`
(hidden 256, 4 layers, 64 experts of width 64; experts stacked [64, 64, 256] / [64, 256, 64]).

1. One optimizer step over every Muon-trained matrix. torch.optim.Muon takes 2-D weights only, so it
   gets each expert as its own 2-D parameter, and it always runs Newton-Schulz in bfloat16; k2mini runs
   it in float32 on CPU by default (the row that matters to a user) and in bfloat16 too (same dtype).
2. Newton-Schulz over one stacked expert weight: one batched call against a Python loop over experts,
   same function, same dtype (k2-mini's wide and tall expert stacks, and k2-micro's for scale).

Goals: k2mini's step no slower than torch's; batched >= 3x the loop.

    python benchmarks/bench_optim.py
"""

from __future__ import annotations

import sys

import math

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import best_times, print_table  # noqa: E402

from k2mini import K2Config, K2ForCausalLM  # noqa: E402
from k2mini.optim import Muon, newton_schulz, split_parameters  # noqa: E402

PRESET = "k2-mini"
STEP_REPEATS = 5
NS_REPEATS = 15


def muon_params(preset: str) -> list[torch.Tensor]:
    """The tensors Muon trains in a K2 model of this preset (attention, FFNs, experts, router)."""
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset(preset))
    roles = split_parameters(model)
    return [p.detach().clone() for _, p in roles["matrices"] + roles["router"]]


def step_candidates(weights: list[torch.Tensor]) -> tuple[dict, dict]:
    """Zero-argument callables doing one optimizer step each, and their parameter counts."""
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(w.shape, generator=g) for w in weights]

    def params_with_grads(split_experts: bool):
        ps = []
        for w, gr in zip(weights, grads):
            pieces = list(zip(w.unbind(), gr.unbind())) if (split_experts and w.ndim == 3) else [(w, gr)]
            for wp, gp in pieces:
                p = torch.nn.Parameter(wp.clone())
                p.grad = gp.clone()
                ps.append(p)
        return ps

    ours32, ours16, theirs = params_with_grads(False), params_with_grads(False), params_with_grads(True)
    opts = {
        "k2mini Muon (float32 NS, experts batched)": Muon(ours32, lr=1e-3, ns_dtype=torch.float32),
        "k2mini Muon (bf16 NS, experts batched)": Muon(ours16, lr=1e-3, ns_dtype=torch.bfloat16),
        "torch.optim.Muon (bf16 NS, 2-D slices)": torch.optim.Muon(theirs, lr=1e-3, adjust_lr_fn="match_rms_adamw"),
    }
    counts = {name: len(o.param_groups[0]["params"]) for name, o in opts.items()}
    return {name: o.step for name, o in opts.items()}, counts


def ns_flops(shape, steps: int = 5) -> float:
    """Multiply-adds x 2 of `steps` Newton-Schulz iterations on a stack [E, A, B] (m = min(A, B), n = max):
    X X^T (2 m^2 n), A A (2 m^3) and (B + aI) X (2 m^2 n) per iteration."""
    *batch, A, B = shape
    m, n = min(A, B), max(A, B)
    return steps * math.prod(batch) * (4 * m * m * n + 2 * m ** 3)


def matmul_peak_gflops(n: int = 1024) -> float:
    x = torch.randn(n, n)
    t = best_times({"mm": lambda: x @ x}, repeats=NS_REPEATS)["mm"]
    return 2 * n ** 3 / t / 1e9


def main():
    torch.set_num_threads(2)
    weights = muon_params(PRESET)
    n_expert_stacks = sum(w.ndim == 3 for w in weights)
    print(f"{PRESET}: {len(weights)} Muon tensors ({n_expert_stacks} stacked expert weights "
          f"{tuple(next(w.shape for w in weights if w.ndim == 3))}), "
          f"{sum(w.numel() for w in weights) / 1e6:.2f}M parameters, threads={torch.get_num_threads()}\n")

    steps, counts = step_candidates(weights)
    t = best_times(steps, repeats=STEP_REPEATS)
    ref = t["torch.optim.Muon (bf16 NS, 2-D slices)"]
    rows = [(name, counts[name], f"{1e3 * s:.1f}", f"{ref / s:.2f}x") for name, s in t.items()]
    print(f"1. one Muon step over all matrices (best of {STEP_REPEATS}, interleaved)")
    print_table(rows, ("optimizer", "tensors", "ms", "speed vs torch"))
    step_ratio = ref / t["k2mini Muon (float32 NS, experts batched)"]

    print(f"\n2. Newton-Schulz over one stacked expert weight, batched vs a loop over experts (best of {NS_REPEATS})")
    experts = [w for w in weights if w.ndim == 3]
    micro = next(w for w in muon_params("k2-micro") if w.ndim == 3)
    cases = [(experts[0], torch.float32), (experts[-1], torch.float32),  # gate/up (wide), down (tall)
             (experts[0], torch.bfloat16), (experts[-1], torch.bfloat16), (micro, torch.float32)]
    rows, ratios, loop_rates = [], {}, {}
    for G, dtype in cases:
        t = best_times(
            {
                "batched": lambda: newton_schulz(G, dtype=dtype),
                "loop": lambda: [newton_schulz(g, dtype=dtype) for g in G.unbind()],
            },
            repeats=NS_REPEATS,
        )
        ratios[(tuple(G.shape), dtype)] = t["loop"] / t["batched"]
        flops = ns_flops(G.shape)
        loop_rates[(tuple(G.shape), dtype)] = flops / t["loop"] / 1e9
        rows.append((str(tuple(G.shape)), str(dtype).removeprefix("torch."), f"{1e3 * t['batched']:.2f}",
                     f"{1e3 * t['loop']:.2f}", f"{t['loop'] / t['batched']:.2f}x",
                     f"{flops / t['batched'] / 1e9:.0f}", f"{flops / t['loop'] / 1e9:.0f}"))
    print_table(rows, ("experts", "dtype", "batched ms", "loop ms", "speed-up", "batched GFLOP/s", "loop GFLOP/s"))
    peak = matmul_peak_gflops()
    fp32_loop = max(r for (shape, dtype), r in loop_rates.items() if dtype == torch.float32)
    print(f"this CPU's float32 matmul rate (one 1024^3 matmul, same process): {peak:.0f} GFLOP/s. The float32 loop "
          f"already runs at up to {fp32_loop:.0f} GFLOP/s, so no batched form can beat it by more than "
          f"{peak / fp32_loop:.1f}x on these shapes")

    worst = min(ratios.values())
    print(f"\ngoal k2mini step <= torch step: {'met' if step_ratio >= 1 else 'NOT met'} ({step_ratio:.2f}x)")
    print(f"goal batched >= 3x loop: {'met' if worst >= 3 else 'NOT met'} in the worst case ({worst:.2f}x)")


if __name__ == "__main__":
    main()
