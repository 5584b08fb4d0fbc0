"""MoE layer forward: k2mini against transformers' DeepseekV3MoE and a dense SwiGLU of equal active width.

One process, same weights, same tokens, float32, 2 threads. A K2-shaped layer: 64 experts, top-8,
1 shared expert, hidden 512, expert width 256, 4096 tokens. The dense anchor is a SwiGLU of width
9 x 256 (8 routed + 1 shared) on the same tokens: the FLOPs one token spends in the MoE layer.

    python benchmarks/bench_moe.py
"""

from __future__ import annotations

import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import best_times, print_table  # noqa: E402

from k2mini import K2Config  # noqa: E402
from k2mini.moe import MoE  # noqa: E402

E, K, HIDDEN, WIDTH, TOKENS = 64, 8, 512, 256, 4096


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = K2Config(
        hidden_size=HIDDEN, moe_intermediate_size=WIDTH, n_routed_experts=E, num_experts_per_tok=K,
        n_shared_experts=1, num_attention_heads=4, intermediate_size=9 * WIDTH,
    )
    ours = MoE(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
        ours.gate.e_score_correction_bias.normal_(0, 0.01)
    hf_config = DeepseekV3Config(**config.to_hf())
    hf = DeepseekV3MoE(hf_config).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1))
        hf.experts.down_proj.copy_(ours.experts.down_proj)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, n).weight.copy_(getattr(ours.shared_experts, n).weight)
    dense = [torch.randn(9 * WIDTH, HIDDEN) * 0.02, torch.randn(9 * WIDTH, HIDDEN) * 0.02,
             torch.randn(HIDDEN, 9 * WIDTH) * 0.02]
    x = torch.randn(1, TOKENS, HIDDEN)

    impls, failed = [], {}
    with torch.no_grad():
        ref = ours(x)[0]
        for impl in ["eager", "batched_mm", "grouped_mm"]:
            hf_config._experts_implementation = impl
            try:
                err = (hf(x) - ref).abs().max().item()
            except RuntimeError as e:  # batched_mm gathers one weight matrix per token-slot
                m = re.search(r"allocate (\d+) bytes", str(e))
                failed[impl] = f"out of memory: asked for {int(m.group(1)) / 1e9:.1f} GB" if m else str(e)[:80]
                continue
            assert err < 1e-4, f"transformers {impl} disagrees with k2mini by {err}"
            impls.append(impl)

    def run_hf(impl):
        def f():
            hf_config._experts_implementation = impl
            hf(x)
        return f

    candidates = {"k2mini MoE": lambda: ours(x)}
    candidates.update({f"transformers {impl}": run_hf(impl) for impl in impls})
    candidates["dense SwiGLU 9x256 (anchor)"] = lambda: F.linear(F.silu(F.linear(x, dense[0])) * F.linear(x, dense[1]), dense[2])
    with torch.no_grad():
        best = best_times(candidates, repeats=7)

    anchor = best["dense SwiGLU 9x256 (anchor)"]
    rows = [(name, f"{t * 1e3:.1f}", f"{t / anchor:.2f}") for name, t in best.items()]
    print(f"MoE forward, {TOKENS} tokens, {E} experts top-{K} + 1 shared, hidden {HIDDEN}, width {WIDTH}, "
          f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows += [(f"transformers {impl}", "failed", msg) for impl, msg in failed.items()]
    print_table(rows, ("implementation", "best ms", "x dense"))
    ours_t = best["k2mini MoE"]
    fastest_hf = min(v for k, v in best.items() if k.startswith("transformers"))
    print(f"\nk2mini / fastest transformers variant: {ours_t / fastest_hf:.2f} (goal < 1)")
    print(f"k2mini / dense of equal active FLOPs:  {ours_t / anchor:.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
