"""Safe opt-in torch.compile for `K2ForCausalLM.compile_layers()`: compiled while training, eager otherwise,
and only after a probe in a child process has shown the compiled code right on this machine.

Why both. torch.compile's CPU backend (inductor, torch 2.13) has failed in ways a user cannot see coming:
on an Intel Xeon with AMX a compiled RMSNorm called under `torch.no_grad()` with 2 threads aborted the
process with glibc heap corruption; under `ATEN_CPU_CAPABILITY=avx2` compiled code returned garbage
(errors of 1e17, NaN logits); under `ATEN_CPU_CAPABILITY=default` the generated C++ does not build
("'at::vec' has not been declared"). So:

- `GradOnly` runs the compiled forward only while autograd records (training steps). Under no_grad or
  inference mode (`evaluate`, `generate`, analysis) it runs the eager forward: those calls never reach the
  code path that aborted, and generate's growing lengths do not trigger a compile per length. It also
  runs eager when the thread count differs from the one the probe checked.
- `check_compile(config, threads)` compiles a two-layer model of the same config in a child process with
  this process's environment and thread count, runs forward and backward compiled and eager, and returns
  the reason it is unsafe (the child died with a signal, failed, or its logits or gradients differ), or
  None. An abort in the child fails the check instead of killing the caller.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import warnings

import torch

PROBE_TOLERANCE = 1e-4  # max abs logit difference, and gradient difference relative to the largest gradient
PROBE_TIMEOUT_S = 900  # a cold compile of the probe takes 20-120 s on 2 busy cores

_verdicts: dict[str, str | None] = {}
_SAYS_WHY = re.compile(r"error|exception|corrupt|free\(\)|abort|fault|killed", re.IGNORECASE)


class CompileUnsafeError(RuntimeError):
    """compile_layers() refused: the compiled code crashed, failed or computed something else here."""


class GradOnly:
    """A module's forward: `compiled` while autograd records at `threads` threads, `eager` otherwise."""

    def __init__(self, eager, compiled, threads: int):
        self.eager, self.compiled, self.threads = eager, compiled, threads
        self.warned = False

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return self.eager(*args, **kwargs)
        if torch.get_num_threads() != self.threads:
            if not self.warned:
                self.warned = True
                warnings.warn(f"compile_layers() was checked at {self.threads} threads, this call runs at "
                              f"{torch.get_num_threads()}: running eager (call compile_layers() again to check "
                              "this thread count)", RuntimeWarning, stacklevel=2)
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def __deepcopy__(self, memo):
        """The compiled code is bound to the original module: a copied model's part runs eager (its own
        forward), never the original's weights; compile the copy again for speed."""
        import copy

        return copy.deepcopy(self.eager, memo)


def settings(threads: int) -> str:
    """The settings a verdict holds for, in words."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    native = torch.backends.cpu.get_cpu_capability()
    return (f"torch {torch.__version__}, {threads} thread{'s' if threads != 1 else ''}, "
            f"ATEN_CPU_CAPABILITY={cap if cap else 'unset'} (native {native})")


def probe_config(config) -> dict:
    """The config the probe compiles: the model's own widths, one dense and one MoE layer at most."""
    layers = min(config.num_hidden_layers, config.first_k_dense_replace + 1)
    return config.replace(num_hidden_layers=max(1, layers)).to_dict()


def check_compile(config, threads: int, compile_kwargs: dict | None = None, probe_code: str | None = None) -> str | None:
    """Why compiling `config`'s layers is unsafe at `threads` threads in this environment, or None if
    the probe's compiled forward and backward equal eager's. Cached per process. `probe_code` replaces
    the child's program (tests inject faults with it)."""
    kwargs = {k: v for k, v in (compile_kwargs or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}
    request = json.dumps({"config": probe_config(config), "compile_kwargs": kwargs}, sort_keys=True)
    key = json.dumps([request, threads, os.environ.get("ATEN_CPU_CAPABILITY"), probe_code])
    if key not in _verdicts:
        _verdicts[key] = _run_probe(request, threads, probe_code)
    return _verdicts[key]


def _run_probe(request: str, threads: int, probe_code: str | None) -> str | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-c", probe_code] if probe_code else [sys.executable, "-m", "k2mini.compile_guard"]
    try:
        done = subprocess.run(cmd, input=request, capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the probe did not finish in {PROBE_TIMEOUT_S} s"
    return verdict(done.returncode, done.stdout, done.stderr)


def verdict(returncode: int, stdout: str, stderr: str) -> str | None:
    """The reason in a probe's exit, or None when it ran and compiled equalled eager."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    # the informative lines: the exception's and the compiler's, not torch's advice on logging
    said = [line for line in lines if _SAYS_WHY.search(line)]
    tail = " | ".join(dict.fromkeys(said[:2] + said[-1:] if said else lines[-3:]))[:600]
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else returncode
        return f"the probe process was killed by {name} (a crash inside compiled code){': ' + tail if tail else ''}"
    if returncode != 0:
        return f"the probe failed (exit {returncode}): {tail or 'no message'}"
    try:
        diffs = json.loads(stdout.strip().splitlines()[-1])
        logits, grads = float(diffs["logits"]), float(diffs["grads"])
    except (ValueError, KeyError, IndexError, TypeError):
        return f"the probe printed no result: {stdout.strip()[-200:]!r}"
    if not logits <= PROBE_TOLERANCE:  # also catches NaN
        return f"compiled logits differ from eager's by {logits:.3g} (tolerance {PROBE_TOLERANCE})"
    if not grads <= PROBE_TOLERANCE:
        return f"compiled gradients differ from eager's by {grads:.3g} of the largest (tolerance {PROBE_TOLERANCE})"
    return None


def _probe_main() -> None:
    """The child: compile a copy of the model, forward + backward both, print the differences as JSON."""
    from .config import K2Config
    from .model import K2ForCausalLM

    request = json.loads(sys.stdin.read())
    config = K2Config(**request["config"])
    torch.manual_seed(0)
    eager = K2ForCausalLM(config)
    compiled = K2ForCausalLM(config)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_layers(check=False, **request["compile_kwargs"])
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (eager, compiled):
        logits = model(ids).logits
        logits.float().logsumexp(-1).mean().backward()
        grads.append((logits.detach(), [p.grad for p in model.parameters()]))
    (a, ga), (b, gb) = grads
    if [g is None for g in ga] != [h is None for h in gb]:
        raise SystemExit("compiled and eager models got gradients for different parameters")
    scale = max(float(g.abs().max()) for g in ga if g is not None) or 1.0
    worst = max((float((g - h).abs().max()) for g, h in zip(ga, gb) if g is not None), default=0.0)
    print(json.dumps({"logits": float((a - b).abs().max()), "grads": worst / scale}))


if __name__ == "__main__":
    _probe_main()
