"""Notebook-scale sweeps as the notebooks run them: tokens per second, the share of this CPU's float32
matmul rate they reach, and where a step's time goes.

    python benchmarks/bench_sweep.py                   # 1 thread, as notebooks 04 and 05 run
    python benchmarks/bench_sweep.py --threads 2 --steps 40 --compile
    python benchmarks/bench_sweep.py --against 35d76bc --ops   # today's library against an earlier commit's
    python benchmarks/bench_sweep.py --shapes '' --jobs 2   # notebook 05's ci sweep in 2 processes (~10 min)

Shapes (k2mini.lab.experiments.RunSpec, as the notebooks build them):
  05  k2-micro with 3 layers, top-4 of E in {8, 16, 32, 64} experts of width 16, AdamW, cosine schedule,
      loss-free bias, batch 16 x 64, seeds x E (notebook 05's full-scale model, section 3; its ci sweep,
      section 2, trains one MoE layer of the same experts on the same batch shape: --jobs times that sweep)
  04  k2-micro, AdamW / Muon / MuonClip, batch 8 x 128 (notebook 04's optimizer x lr sweep)

Paths, each against the first (the library's defaults, "today", or with --against REV that revision's
library), in one process, runs interleaved:
  @REV      (--against REV) git revision REV's k2mini, imported beside today's (library_at.py): the same runs
            on the earlier code. "bitwise" says whether every run's losses and final weights are equal bit for bit
  foreach   AdamW groups with foreach=True: torch's multi-tensor AdamW (on CPU torch picks the per-tensor
            loop). Measured on the CI machine: 1.00-1.06x, bitwise equal on 1 thread but not on 2, so it is
            not the default
  compiled  model.compile_layers() (with --compile: compilation costs minutes on 2 busy cores, and is
            excluded from the timing)
  bf16      the whole run under torch.autocast("cpu", bfloat16): float32 master weights and optimizer, matmuls
            in bfloat16 (with --bf16). Its losses are not today's: "max |dloss|" is what bf16 costs in
            accuracy over the run, and the bf16 / float32 rate of a large matmul, measured first, says
            whether this CPU computes bf16 natively (AMX, AVX-512 BF16) or emulates it
A path's losses must equal today's to float tolerance (printed, and checked against 1e-4 nats), except bf16's.

The anchor is a 2048^3 float32 matmul timed in the same process at the same thread count. A step's
FLOPs are counted from its matmuls (6 x active matmul parameters x tokens, plus attention's
QK^T and PV, forward and backward); "share" is that count over the step's time, against the anchor.
Where the time goes: the best step time at 1, 4 and 16 sequences of 64 tokens, fitted as
fixed + per-sequence, the fixed part being per-op overhead that does not grow with tokens (per library
with --against, interleaved step by step).

--jobs N: notebook 05's ci sweep itself (21 runs x 400 steps of its section 2: k2mini.lab.margins.specs_05)
through run_sweep as the notebook calls it (no run cache), in N processes of one thread each (run_sweep's
jobs=N, the notebook's default on an N-core machine) against one process of one thread, each twice, taking
turns: the whole sweep's wall time, the start of the worker processes included, and whether every run's
history and final weights are equal bit for bit (each run does the same one-thread arithmetic wherever it
runs).

--ops: the ATen ops one step dispatches (notebook 05's model at E = 32, 16 x 64, AdamW), by the k2mini
phase that issues them (step_ops.py), those of one evaluation batch, and a MuonClip step's in total.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

LOSS_TOL = 1e-4  # nats: float reassociation, not a different trajectory, at these step counts
GOAL_SPEEDUP, GOAL_SHARE = 4.0, 0.40


def matmul_rate(threads: int, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n^3 matmul in `dtype`, best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


class Anchor:
    """This CPU's 1-thread float32 matmul rate: the best of measurements taken all through the benchmark
    (the machine's load moves between runs; the best is what the CPU can do, so shares are not flattered)."""

    def __init__(self):
        self.best = 0.0

    def measure(self, threads: int) -> float:
        torch.set_num_threads(1)
        self.best = max(self.best, matmul_rate(1, n=1024, repeats=3), matmul_rate(1) if not self.best else 0.0)
        torch.set_num_threads(threads)
        return self.best


def step_flops(config, batch: int, seq: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward)."""
    counts = config.param_counts()
    embed = config.vocab_size * config.hidden_size  # a lookup, not a matmul
    matmul_params = counts["active"] - embed
    tokens = batch * seq
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    attn = 2 * batch * config.num_attention_heads * seq * seq * (qk + config.v_head_dim) * config.num_hidden_layers
    return 3 * (2 * matmul_params * tokens + attn)


def sweep_specs(shape: str, steps: int, seeds: list[int]):
    from k2mini.lab.experiments import RunSpec

    if shape == "05":
        base = RunSpec(preset="k2-micro", config={"num_hidden_layers": 3, "num_experts_per_tok": 4, "moe_intermediate_size": 16},
                       optimizer="adamw", lr=5e-3, steps=steps, batch_size=16, seq_len=64, eval_every=steps,
                       eval_batches=max(1, round(4 * 16 * steps / 200)),  # the notebook's 4 x 16 batches per 200 steps
                       train={"balancing": "loss_free", "bias_update_speed": 1e-2, "schedule": "cosine", "warmup_steps": 20})
        return [base.replace(config={**base.config_overrides, "n_routed_experts": e}, seed=s, label=f"E={e} seed {s}")
                for e in (8, 16, 32, 64) for s in seeds]
    common = dict(preset="k2-micro", steps=steps, weight_decay=0.1, batch_size=8, seq_len=128, eval_every=steps,
                  eval_batches=max(1, round(6 * 4 * steps / 150)), train={"schedule": "cosine", "warmup_steps": max(1, steps // 10)})
    return [RunSpec(optimizer=k, lr=3e-2, tau=30.0, seed=s, data_seed=s, label=f"{k} seed {s}", **common)
            for k in ("adamw", "muon", "muonclip") for s in seeds]


class Library:
    """What a sweep run needs from one k2mini package: today's, or an earlier revision's (library_at)."""

    def __init__(self, package=None):
        import importlib

        import k2mini

        package = package or k2mini
        name = package.__name__
        self.name = name
        self.train = package.train
        self.experiments = importlib.import_module(f"{name}.lab.experiments")
        self.build_optimizer = importlib.import_module(f"{name}.optim").build_optimizer
        training = importlib.import_module(f"{name}.training")
        self.train_step, self.TrainConfig = training.train_step, training.TrainConfig

    def build_model(self, spec):
        """spec's model, built by this library from its own RunSpec (the same settings)."""
        return self.experiments.build_model(self.experiments.RunSpec.from_settings(spec.settings(), spec.label))


def run(spec, path: str, data, libraries: dict, step_times: list | None = None):
    """Train one run as k2mini.lab.experiments.run_one does, on `path`; (losses, final weights, wall seconds)."""
    lib = libraries.get(path, libraries["today"])
    model = lib.build_model(spec)
    opt = lib.build_optimizer(model, spec.optimizer, lr=spec.lr, weight_decay=spec.weight_decay, tau=spec.tau)
    if path == "foreach":
        for g in opt.param_groups:
            g["foreach"] = True
    if path == "compiled":
        model.compile_layers()
        lib.train(model, data, opt, 2, batch_size=spec.batch_size, seq_len=spec.seq_len, eval_every=0, progress=False)
        model = lib.build_model(spec).compile_layers()  # compiled above; fresh weights, same graphs (cached)
        opt = lib.build_optimizer(model, spec.optimizer, lr=spec.lr, weight_decay=spec.weight_decay, tau=spec.tau)
    marks = []
    settings = dict(batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.batch_seed,
                    eval_every=spec.eval_every, eval_batches=spec.eval_batches, **spec.train_settings)
    # one autocast region around the whole run, as a user would write it (train() clears autocast's cast cache
    # after every optimizer step, so each forward casts the updated weights)
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if path == "bf16" else contextlib.nullcontext()
    t0 = time.perf_counter()
    with precision:
        h = lib.train(model, data, opt, spec.steps, progress=False,
                      callback=lambda s, r: marks.append(time.perf_counter()), **settings)
    wall = time.perf_counter() - t0
    if step_times is not None:
        step_times.extend(np.diff([t0, *marks]))
    return h["train_loss"].to_numpy(), model.state_dict(), wall


def sweep(shape: str, steps: int, seeds: list[int], paths: list[str], anchor: Anchor, threads: int, libraries: dict):
    """Every run of the sweep on every path; returns a function printing the table (against the anchor as
    it stands at the end) and returning {path: (tokens/s, share per core)}."""
    from tqdm.auto import tqdm

    from k2mini.lab.experiments import PreparedBatches, _dataset

    specs = sweep_specs(shape, steps, seeds)
    base = paths[0]
    walls, worst = {p: 0.0 for p in paths}, {p: 0.0 for p in paths}
    bitwise = {p: True for p in paths}
    noise = 0.0
    for i, spec in enumerate(tqdm(specs, desc=f"notebook {shape} sweep")):
        data = PreparedBatches(_dataset(spec.corpus), spec.batch_size, spec.seq_len, spec.batch_seed)
        if threads > 1:  # the same path twice: 2 threads are not bitwise reproducible run to run (1 thread is)
            noise = max(noise, float(np.abs(run(spec, base, data, libraries)[0] - run(spec, base, data, libraries)[0]).max()))
        losses, weights = {}, {}
        anchor.measure(threads)
        # interleaved, so that background load hits every path alike, and in turns first (warm-up costs alike)
        for p in (paths if i % 2 == 0 else paths[::-1]):
            losses[p], weights[p], wall = run(spec, p, data, libraries)
            walls[p] += wall
        for p in paths:
            worst[p] = max(worst[p], float(np.abs(losses[p] - losses[base]).max()))
            bitwise[p] &= bool(np.array_equal(losses[p], losses[base])) and weights[p].keys() == weights[base].keys() \
                and all(torch.equal(weights[p][k], weights[base][k]) for k in weights[base])
    tokens = sum(s.steps * s.batch_size * s.seq_len for s in specs)
    flops = sum(step_flops(s.model_config(), s.batch_size, s.seq_len) * s.steps for s in specs)

    def report():
        print(f"\nnotebook {shape} shape: {len(specs)} runs x {steps} steps (evaluation batches in the notebook's proportion; shares count training FLOPs only), {threads} thread(s)")
        tol = max(LOSS_TOL, 2 * noise)
        if threads > 1:
            print(f"the same path run twice differs by up to {noise:.1e} in loss; paths count as equal within {tol:.1e}")
        return _table(paths, walls, worst, bitwise, tokens, flops, threads, anchor.best, tol)
    return report


def _table(paths, walls, worst, bitwise, tokens, flops, threads, anchor_1, tol):
    table, out = [], {}
    base = paths[0]
    for p in paths:
        rate = flops / walls[p] / 1e9
        share = rate / threads / anchor_1
        out[p] = (tokens / walls[p], share)
        table.append((p, f"{walls[p]:.1f}", f"{tokens / walls[p]:,.0f}", f"{walls[base] / walls[p]:.2f}x",
                      f"{rate:.1f}", f"{share:.1%}", f"{worst[p]:.1e}", "yes" if worst[p] <= tol else "NO",
                      "yes" if bitwise[p] else "no"))
    print_table(table, ("path", "wall s", "tokens/s", f"vs {base}", "GFLOP/s", "per core / anchor", "max |dloss|",
                        "losses equal", "bitwise (losses, weights)"))
    if "bf16" in out:
        print("bf16: its max |dloss| is what bfloat16 matmuls cost in accuracy over the run, not a tolerance miss")
    return out


def where_time_goes(steps: int, threads: int, anchor: Anchor, libraries: dict, spec0=None,
                    what: str = "notebook 05's model at E = 32") -> dict[str, tuple[float, float]]:
    """Best step time at 1, 4, 16 sequences of 64 tokens (spec0's model, by default notebook 05's full-scale
    one at E = 32) for each library, all interleaved step by step, fitted as fixed + per-sequence; returns
    {library: (fixed s, s per sequence)}."""
    from k2mini.lab.experiments import PreparedBatches, _dataset

    spec0 = spec0 or sweep_specs("05", steps, [0])[2]  # E = 32
    seqs, runs = [1, 4, 16], []
    for name, lib in libraries.items():
        for n in seqs:
            model = lib.build_model(spec0).train()
            opt = lib.build_optimizer(model, "adamw", lr=spec0.lr, weight_decay=spec0.weight_decay)
            for g in opt.param_groups:
                g.setdefault("peak_lr", g["lr"])
            cfg = lib.TrainConfig(steps=steps, batch_size=n, seq_len=spec0.seq_len, **spec0.train_settings)
            runs.append((name, n, lib, model, opt, PreparedBatches(_dataset(spec0.corpus), n, spec0.seq_len, 0), cfg))
    best = [float("inf")] * len(runs)
    for step in range(steps):
        anchor.measure(threads)
        for i, (_, _, lib, model, opt, data, cfg) in enumerate(runs):
            t = time.perf_counter()
            lib.train_step(model, model, opt, data, step, cfg)
            if step >= 2:  # the first steps allocate
                best[i] = min(best[i], time.perf_counter() - t)
    anchor_1 = anchor.best
    print(f"\nwhere a step's time goes ({what}, {threads} thread(s), best of {steps - 2} "
          "interleaved steps):")
    rows, fits = [], {}
    fl_seq = step_flops(spec0.model_config(), 1, spec0.seq_len)
    for name in libraries:
        mine = [(n, t) for (lib_name, n, *_), t in zip(runs, best) if lib_name == name]
        per_seq, fixed = np.polyfit([n for n, _ in mine], [t for _, t in mine], 1)
        fits[name] = (fixed, per_seq)
        for n, t in mine:
            fl = step_flops(spec0.model_config(), n, spec0.seq_len)
            rows.append((name, f"{n} x 64", f"{t * 1e3:.1f}", f"{fixed / t:.0%}", f"{fl / t / 1e9:.1f}",
                         f"{fl / t / 1e9 / threads / anchor_1:.1%}"))
    print_table(rows, ("library", "batch", "step ms", "fixed part", "GFLOP/s", "per core / anchor"))
    for name, (fixed, per_seq) in fits.items():
        print(f"fit ({name}): {fixed * 1e3:.1f} ms fixed per step + {per_seq * 1e3:.2f} ms per 64-token sequence; the "
              f"token-proportional work runs at {fl_seq / per_seq / 1e9:.1f} GFLOP/s ({fl_seq / per_seq / 1e9 / threads / anchor_1:.1%} "
              "of the anchor per core)")
    return fits


def in_processes(jobs: int, anchor: Anchor, repeats: int = 2) -> tuple[float, float | None]:
    """Notebook 05's ci sweep through run_sweep in `jobs` one-thread processes against one process, taking
    turns `repeats` times; prints the table and its model's fixed and per-sequence parts of a step. Returns the
    best speedup of the processes and the speedup per process if the whole fixed part went (the most that
    stacking the runs into one computation could give), or None if the fit is unusable."""
    from k2mini.lab.experiments import run_sweep
    from k2mini.lab.margins import specs_05

    specs = [s for part in specs_05(0) for s in part]
    steps = specs[0].steps
    torch.set_num_threads(1)
    walls = {1: [], jobs: []}
    results = {}
    for r in range(repeats):
        for j in ((1, jobs) if r % 2 == 0 else (jobs, 1)):
            t = time.perf_counter()
            results[j] = run_sweep(specs, cache=False, progress=False, jobs=j)
            walls[j].append(time.perf_counter() - t)
    same = all(a.history.drop(columns="wall_time").equals(b.history.drop(columns="wall_time"))
               and all(torch.equal(a.state[k], b.state[k]) for k in a.state)
               for a, b in zip(results[1], results[jobs]))
    tokens = sum(s.steps * s.batch_size * s.seq_len for s in specs)
    rows = [(f"{j} process{'es' if j > 1 else ''} x 1 thread", " / ".join(f"{w:.1f}" for w in walls[j]),
             f"{tokens / min(walls[j]):,.0f}", f"{min(walls[1]) / min(walls[j]):.2f}x") for j in (1, jobs)]
    print(f"\nnotebook 05's ci sweep through run_sweep ({len(specs)} runs x {steps} steps, evaluation included, "
          f"{os.cpu_count()} CPUs), each layout {repeats} times, in turns:")
    print_table(rows, ("layout", "wall s", "tokens/s (best)", "vs 1 process"))
    print(f"every run's history and final weights bit for bit equal across layouts: {'yes' if same else 'NO'}")
    procs = min(walls[1]) / min(walls[jobs])
    e32 = next(s for s in specs if s.model_config().n_routed_experts == 32)
    fixed, per_seq = where_time_goes(30, 1, anchor, {"today": Library()}, e32, "notebook 05's ci model at E = 32")["today"]
    step = fixed + e32.batch_size * per_seq
    if fixed <= 0 or per_seq <= 0:
        print("(the fixed / per-sequence fit is unusable: the machine's load changed during it; run again)")
        return procs, None
    return procs, step / (step - fixed)


def op_census(libraries: dict) -> None:
    """The ATen ops of one training step (after 3 warm-up steps) and of one evaluation batch, by phase."""
    from step_ops import by_phase, op_census as census

    from k2mini.lab.experiments import PreparedBatches, _dataset

    spec0 = sweep_specs("05", 20, [0])[2]  # E = 32, 16 x 64, AdamW
    table: dict[str, dict[str, int]] = {}
    for name, lib in libraries.items():
        model = lib.build_model(spec0).train()
        opt = lib.build_optimizer(model, "adamw", lr=spec0.lr, weight_decay=spec0.weight_decay)
        for g in opt.param_groups:
            g.setdefault("peak_lr", g["lr"])
        data = PreparedBatches(_dataset(spec0.corpus), spec0.batch_size, spec0.seq_len, 0)
        cfg = lib.TrainConfig(steps=20, batch_size=spec0.batch_size, seq_len=spec0.seq_len, eval_every=0,
                              **spec0.train_settings)
        for step in range(3):
            lib.train_step(model, model, opt, data, step, cfg)
        history_row = __import__(f"{lib.name}.run.history", fromlist=["history_row"]).history_row
        evaluate = __import__(f"{lib.name}.training", fromlist=["evaluate"]).evaluate

        def step():  # as train() runs a logged step
            history_row(3, lib.train_step(model, model, opt, data, 3, cfg), opt, model.moe_layers(), cfg)

        phases = by_phase(census(step)[0])
        clip_model = lib.build_model(spec0).train()  # a MuonClip step of the same model, in total
        clip_opt = lib.build_optimizer(clip_model, "muonclip", lr=spec0.lr, weight_decay=spec0.weight_decay)
        for g in clip_opt.param_groups:
            g.setdefault("peak_lr", g["lr"])
        for s in range(3):
            lib.train_step(clip_model, clip_model, clip_opt, data, s, cfg)
        phases["one MuonClip step instead (same model and batch), all"] = sum(census(
            lambda: history_row(3, lib.train_step(clip_model, clip_model, clip_opt, data, 3, cfg), clip_opt,
                                clip_model.moe_layers(), cfg))[0].values())
        with torch.profiler.profile(record_shapes=False) as prof:
            step()
        phases["torch.profiler's aten:: events of a step (composites and nested calls too)"] = sum(
            e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        phases["one evaluation batch (16 x 64)"] = sum(census(lambda: evaluate(model, data, 16, 64, 1))[0].values())
        table[name] = phases
    names = list(table)
    phases = sorted({p for t in table.values() for p in t}, key=lambda p: -table[names[-1]].get(p, 0))
    extra = ("evaluation", "profiler", "MuonClip")
    rows = [(p, *(f"{table[n].get(p, 0):,}" for n in names)) for p in phases if not any(x in p for x in extra)]
    rows.append(("one training step, all", *(f"{sum(v for p, v in table[n].items() if not any(x in p for x in extra)):,}"
                                             for n in names)))
    rows += [(p, *(f"{table[n].get(p, 0):,}" for n in names)) for p in phases if any(x in p for x in extra)]
    print("\nATen ops dispatched (below autograd: backward's included, a composite counted as the ops it becomes) by "
          "the k2mini phase that issues them, notebook 05's model at E = 32, AdamW, 16 x 64, one logged step:")
    print_table(rows, ("phase", *names))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per run (the notebooks run 150-200)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--shapes", default="05,04", help="sweeps to time: 05, 04, both, or none ('')")
    parser.add_argument("--compile", action="store_true", help="also time model.compile_layers()")
    parser.add_argument("--bf16", action="store_true", help="also time the runs under bfloat16 autocast")
    parser.add_argument("--no-foreach", dest="foreach", action="store_false", help="skip the foreach AdamW path")
    parser.add_argument("--against", metavar="REV", help="also time git revision REV's library, as the baseline")
    parser.add_argument("--ops", action="store_true", help="print the ATen ops of one step by phase")
    parser.add_argument("--jobs", type=int, default=0,
                        help="also time notebook 05's ci sweep in this many one-thread processes (run_sweep's jobs)")
    args = parser.parse_args()
    libraries = {"today": Library()}
    if args.against:
        from library_at import library_at

        old = Library(library_at(args.against))
        libraries = {"@" + old.name.split("_", 1)[1]: old, **libraries}
    if args.ops:
        op_census(libraries)
    anchor = Anchor()
    anchor.measure(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}")
    paths = [*libraries] + (["foreach"] if args.foreach else []) + (["compiled"] if args.compile else []) + (
        ["bf16"] if args.bf16 else [])
    base = paths[0]
    if args.bf16:
        torch.set_num_threads(args.threads)
        rate32, rate16 = matmul_rate(args.threads), matmul_rate(args.threads, dtype=torch.bfloat16)
        print(f"2048^3 matmul: float32 {rate32:.0f} GFLOP/s, bfloat16 {rate16:.0f} GFLOP/s ({rate16 / rate32:.2f}x): "
              f"{'this CPU computes bf16 natively' if rate16 > 1.2 * rate32 else 'bf16 is no faster than float32 here'}")
    shapes = [s for s in args.shapes.split(",") if s]
    reports = {shape: sweep(shape, args.steps, list(range(args.seeds)), paths, anchor, args.threads, libraries)
               for shape in shapes}
    fits = where_time_goes(max(args.steps, 8), args.threads, anchor, libraries)
    print(f"\nanchor: float32 matmul (1024^3 and 2048^3) at best {anchor.best:.1f} GFLOP/s on 1 thread, measured "
          "before every run; every share here is against it")
    results = {shape: report() for shape, report in reports.items()}
    WORK = ("matmuls of 16-260 columns, torch's per-expert grouped-matmul loop, attention and elementwise passes, "
            "none of which goes faster without changing the arithmetic")
    if "05" in results:
        best = max(results["05"], key=lambda p: results["05"][p][0])
        speedup = results["05"][best][0] / results["05"][base][0]
        share = results["05"][best][1]
        print(f"\ngoal: notebook 05's sweep >= {GOAL_SPEEDUP:g}x {base}'s tokens/s: {speedup:.2f}x ({best}, one process): "
              f"{'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}")
        fixed, per_seq = fits["today"]
        step16 = fixed + 16 * per_seq
        if speedup < GOAL_SPEEDUP and per_seq > 0 and fixed > 0:
            print(f"  why: removing the whole fixed part ({fixed * 1e3:.1f} ms of {step16 * 1e3:.1f} ms at 16 x 64) would give "
                  f"{step16 / (16 * per_seq):.2f}x; 4x needs the token-proportional work itself "
                  f"{4 / (step16 / (16 * per_seq)):.2f}x faster as well, and that work is {WORK}")
        elif speedup < GOAL_SPEEDUP:
            print("  (the fixed / per-sequence fit is unusable: the machine's load changed during it; run again)")
        print(f"goal: >= {GOAL_SHARE:.0%} of one core's matmul rate per core: {share:.1%}: "
              f"{'met' if share >= GOAL_SHARE else 'NOT met'}")
    if args.jobs > 1:
        procs, stacked = in_processes(args.jobs, anchor)
        print(f"\ngoal: notebook 05's ci sweep on {args.jobs} cores >= {GOAL_SPEEDUP:g}x one process's tokens/s: "
              f"{procs:.2f}x ({args.jobs} one-thread processes): {'met' if procs >= GOAL_SPEEDUP else 'NOT met'}")
        if procs < GOAL_SPEEDUP and stacked:
            print(f"  why: {args.jobs} processes give at most {args.jobs}x; removing every step's whole fixed part, the most "
                  f"that stacking the runs into one computation could save, would give {stacked:.2f}x per process, "
                  f"{procs * stacked:.2f}x in all; {GOAL_SPEEDUP:g}x needs the token-proportional work itself "
                  f"{GOAL_SPEEDUP / (procs * stacked):.2f}x faster as well, and that work is {WORK}")


if __name__ == "__main__":
    main()
