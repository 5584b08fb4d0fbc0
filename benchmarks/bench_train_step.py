"""A training step, k2mini against transformers' DeepseekV3 on the same weights, as the experts grow.

One process, float32, the same tokens and weights for both. For each shape and thread count: the
forward (logits) and the forward + backward (cross-entropy, as the training loop runs it; k2mini
with the telemetry the loop asks for: routing and exact per-head max logits). transformers runs
every experts implementation it offers on this machine; the ratio is against its fastest one.

Shapes:
- "sweep E=16/64/256": hidden 128, two layers (one dense, one MoE), top-4 + 1 shared, 8 x 128 tokens;
  the growth of the step from 16 to 256 experts shows an O(E^2) path that one size hides.
- "K2-mini shape": k2-mini with 32 experts (hidden 256, 4 layers, top-4), 4 x 256 tokens.

The machine's roof: the FLOPs of the step (torch's FlopCounterMode) over its time, as a fraction
of this CPU's large float32 matmul rate measured in the same process.

    python benchmarks/bench_train_step.py            # 1 and 2 threads
    python benchmarks/bench_train_step.py --threads 2
    python benchmarks/bench_train_step.py --compile  # also k2mini with compile_layers() at the K2-mini shape
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import best_times, print_table  # noqa: E402

import k2mini  # noqa: E402
from k2mini import K2Config  # noqa: E402

SWEEP = dict(
    vocab_size=260, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=4, num_experts_per_tok=4, n_shared_experts=1,
    q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    routed_scaling_factor=2.827, max_position_embeddings=1024,
)
SHAPES = [
    ("E=16", dict(SWEEP, n_routed_experts=16), (8, 128)),
    ("E=64", dict(SWEEP, n_routed_experts=64), (8, 128)),
    ("E=256", dict(SWEEP, n_routed_experts=256), (8, 128)),
    ("K2-mini E=32", dict(K2Config.preset("k2-mini").to_dict(), n_routed_experts=32), (4, 256)),
]
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's float32 rate on one large square matmul, FLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = best_times({"mm": lambda: a @ b}, repeats=repeats)["mm"]
    return 2 * n**3 / best


def pair(config_dict: dict):
    """transformers' DeepseekV3ForCausalLM (random) and k2mini loaded from its saved checkpoint."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = K2Config(**config_dict)
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**config.to_hf())).train()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.05)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = k2mini.load_pretrained(d, progress=False).train()
    return hf, ours


def steps(hf, ours, ids, target):
    def loss(logits):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def ours_fwd():
        with torch.no_grad():
            ours(ids, telemetry=True)

    def ours_step():
        loss(ours(ids, telemetry=True).logits).backward()

    def hf_fwd(impl):
        def f():
            hf.config._experts_implementation = impl
            with torch.no_grad():
                hf(ids)
        return f

    def hf_step(impl):
        def f():
            hf.config._experts_implementation = impl
            loss(hf(ids).logits).backward()
        return f

    usable = []
    for impl in HF_IMPLS:  # not every implementation runs on every machine
        try:
            hf_step(impl)()
            usable.append(impl)
        except (RuntimeError, NotImplementedError, KeyError) as e:
            print(f"  transformers {impl}: not usable here ({str(e).splitlines()[0][:70]})")
    fwd = {"k2mini": ours_fwd, **{f"transformers {i}": hf_fwd(i) for i in usable}}
    step = {"k2mini": ours_step, **{f"transformers {i}": hf_step(i) for i in usable}}
    return fwd, step, loss


def check_parity(hf, ours, ids, loss):
    """The two models agree before they are timed: logits and one expert-stack gradient."""
    for m in (hf, ours):
        m.zero_grad(set_to_none=True)
    hf.config._experts_implementation = "eager"
    a, b = hf(ids).logits, ours(ids).logits
    assert (a - b).abs().max() < 1e-4, "k2mini and transformers disagree on the logits"
    loss(a).backward()
    loss(b).backward()
    i = ours.moe_layers()[0].index
    ref = hf.model.layers[i].mlp.experts.down_proj.grad
    got = ours.model.layers[i].mlp.experts.down_proj.grad
    assert (ref - got).abs().max() <= 1e-4 * ref.abs().max(), "gradients disagree"


def step_flops(ours, ids, loss) -> int:
    with FlopCounterMode(display=False) as counter:
        loss(ours(ids, telemetry=True).logits).backward()
    return counter.get_total_flops()


MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm",
           "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def matmul_seconds(run, repeats: int = 3) -> float:
    """Seconds per call that `run` spends inside matrix products (the profiler's self time of the
    matmul kernels, best of `repeats`): the part of a step that only faster matmuls could shorten."""
    from torch.profiler import profile

    best = float("inf")
    for _ in range(repeats):
        with profile() as prof:
            run()
        best = min(best, sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS) / 1e6)
    return best


def add_compiled(fwd: dict, step: dict, config_dict: dict, ids, loss) -> float:
    """k2mini with compile_layers() as one more candidate; returns the seconds its compilation took."""
    _, compiled = pair(config_dict)
    t0 = time.perf_counter()
    compiled.compile_layers()  # includes its safety probe (a child process compiling a two-layer model)
    for _ in range(2):  # compiled code runs only while autograd records: under no_grad the layers run eager
        loss(compiled(ids, telemetry=True).logits).backward()
    compiled.zero_grad(set_to_none=True)

    def compiled_fwd():  # under no_grad compile_layers() runs the layers eager (its safety rule): ~1.00x
        with torch.no_grad():
            compiled(ids, telemetry=True)

    fwd["k2mini compiled"] = compiled_fwd
    step["k2mini compiled"] = lambda: loss(compiled(ids, telemetry=True).logits).backward()
    return time.perf_counter() - t0


def run(threads: int, repeats: int, compile_: bool = False):
    torch.set_num_threads(threads)
    rate = matmul_rate()
    print(f"\n## {threads} thread(s): large float32 matmul rate {rate / 1e9:.0f} GFLOP/s")
    rows, growth, compiled_rows = [], {}, []
    for name, config_dict, (B, T) in SHAPES:
        hf, ours = pair(config_dict)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 256, (B, T), generator=g)
        target = torch.randint(0, 256, (B, T), generator=g)
        fwd, step, loss = steps(hf, ours, ids, target)
        check_parity(hf, ours, ids, loss)
        if compile_ and name.startswith("K2-mini"):
            took = add_compiled(fwd, step, config_dict, ids, loss)
        flops = step_flops(ours, ids, loss)
        t_fwd = best_times(fwd, repeats=repeats)
        t_step = best_times(step, repeats=repeats)
        in_matmuls = matmul_seconds(step["k2mini"])
        for m in (hf, ours):
            m.zero_grad(set_to_none=True)
        hf_fwd = min(v for k, v in t_fwd.items() if k.startswith("transformers"))
        hf_step = min(v for k, v in t_step.items() if k.startswith("transformers"))
        best_fwd = min((v, k) for k, v in t_fwd.items() if k.startswith("transformers"))[1].split()[1]
        best_step = min((v, k) for k, v in t_step.items() if k.startswith("transformers"))[1].split()[1]
        if "k2mini compiled" in t_step:
            compiled_rows.append((name, f"{took:.0f}", f"{t_fwd['k2mini compiled'] * 1e3:.1f}",
                                  f"{t_fwd['k2mini'] / t_fwd['k2mini compiled']:.2f}x",
                                  f"{t_step['k2mini compiled'] * 1e3:.1f}",
                                  f"{t_step['k2mini'] / t_step['k2mini compiled']:.2f}x",
                                  f"{hf_step / t_step['k2mini compiled']:.2f}x"))
        growth[name] = (t_step["k2mini"], hf_step)
        rows.append((
            name, f"{B}x{T}",
            f"{t_fwd['k2mini'] * 1e3:.1f}", f"{hf_fwd * 1e3:.1f} ({best_fwd})", f"{hf_fwd / t_fwd['k2mini']:.2f}x",
            f"{t_step['k2mini'] * 1e3:.1f}", f"{hf_step * 1e3:.1f} ({best_step})", f"{hf_step / t_step['k2mini']:.2f}x",
            f"{flops / 1e9:.2f}", f"{flops / t_step['k2mini'] / rate:.0%}", f"{flops / hf_step / rate:.0%}",
            f"{hf_step * rate / flops:.2f}x", f"{in_matmuls / t_step['k2mini']:.0%}", f"{hf_step / in_matmuls:.2f}x",
        ))
    print_table(rows, ("shape", "tokens", "k2mini fwd ms", "transformers fwd ms", "k2mini speed",
                       "k2mini step ms", "transformers step ms", "k2mini speed", "step GFLOP",
                       "k2mini % of matmul rate", "transformers %", "roof", "k2mini in matmuls",
                       "matmul floor"))
    print("roof: the speed over transformers' step if every FLOP ran at the large-matmul rate;"
          " matmul floor: the same if k2mini's step did nothing but its matrix products, at the speed these"
          " shapes get (profiled); where the floor is under 1.5x the 1.5x goal is out of reach without faster"
          " matmul kernels, which both implementations share")
    if compiled_rows:
        print("\nwith model.compile_layers() (torch.compile of attention, norms, dense FFN, shared experts):")
        print_table(compiled_rows, ("shape", "compile s", "fwd ms", "vs eager", "step ms", "vs eager",
                                    "speed vs transformers"))
    ours16, hf16 = growth["E=16"]
    ours256, hf256 = growth["E=256"]
    print(f"step time from 16 to 256 experts: k2mini x{ours256 / ours16:.2f}, transformers x{hf256 / hf16:.2f} "
          f"(goal: k2mini's growth <= transformers')")


def attention_sweep(threads: int, repeats: int):
    """One k2-mini MLA layer, forward + backward with its max logits, materialized against fused, as the
    sequence grows: where the fused kernel starts to pay (attention.FUSED_FROM_KEYS)."""
    from k2mini.attention import FUSED_FROM_KEYS, MultiHeadLatentAttention
    from k2mini.rope import rope_cos_sin, rope_frequencies

    torch.set_num_threads(threads)
    config = K2Config.preset("k2-mini").replace(max_position_embeddings=8192)
    attn = MultiHeadLatentAttention(config)
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    inv_freq, factor = rope_frequencies(config)
    rows = []
    for T in (128, 256, 512, 1024, 2048):
        B = max(1, 1024 // T)
        x = torch.randn(B, T, config.hidden_size)
        cos, sin = rope_cos_sin(torch.arange(T), inv_freq, factor)

        def run(kernel):
            def f():
                attn.kernel = kernel
                out, max_logit, _ = attn(x, cos, sin)
                out.sum().backward()
            return f

        t = best_times({k: run(k) for k in ("materialized", "fused")}, repeats=repeats)
        rows.append((f"{B}x{T}", f"{t['materialized'] * 1e3:.1f}", f"{t['fused'] * 1e3:.1f}",
                     f"{t['materialized'] / t['fused']:.2f}x"))
    print(f"\n## MLA forward + backward with exact max logits, {threads} thread(s) "
          f"(k2mini takes the fused kernel from {FUSED_FROM_KEYS} keys on)")
    print_table(rows, ("tokens", "materialized ms", "fused ms", "fused speed"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time compile_layers() at the K2-mini shape")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, float32; ratio = transformers' fastest time / k2mini's (goal >= 1.5x)")
    t0 = time.perf_counter()
    for threads in args.threads:
        run(threads, args.repeats, args.compile)
        attention_sweep(threads, args.repeats)
    print(f"\n(benchmark took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
