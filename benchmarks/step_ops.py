"""Where a training step's ATen ops come from: every op dispatched (forward, backward, optimizer, ...)
counted and attributed to the k2mini function that issued it.

A `TorchDispatchMode` sees each op below autograd (the kernels that run; a composite such as `linear`
is counted as the `t` + `mm` it becomes, and backward's ops too, since on CPU they run in the calling
thread). Each op is attributed by the Python stack at that moment: its outermost phase (evaluation, the
optimizer, the bias update, a history row, ...) and, inside the forward, the module file and function.

bench_sweep.py --ops prints the census of one notebook-05-shape step; `op_census` is reusable.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

_PACKAGE = re.compile(re.escape(os.sep) + r"k2mini(_[0-9a-f]+)?" + re.escape(os.sep))  # also library_at's copies

# (function name, phase) checked from the outermost k2mini frame inwards: the first that matches names the phase
_PHASES = {
    "evaluate": "evaluation (per evaluation, not per step)",
    "history_row": "history row (telemetry to floats)",
    "_update_correction_biases": "loss-free bias update",
    "clip_grad_norm_": "gradient norm + clip",
    "_balancing_loss": "balancing loss",
    "_optimizer_step": "optimizer",
}
_FORWARD_FILES = {"attention.py": "attention (MLA)", "norm.py": "RMSNorm", "rope.py": "rope", "moe.py": "MoE"}
_MOE_ROUTING = {"route", "router_scores", "choose_experts", "mixing_weights", "Router.forward"}
_MOE_EXPERTS = {"grouped_experts", "slots_by_expert", "grouped_linear", "Experts.forward"}


class _Census(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()  # (phase, detail) -> ops
        self.ops: Counter = Counter()  # (phase, op name) -> ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        phase, detail = _where(sys._getframe(1))
        self.counts[phase, detail] += 1
        self.ops[phase, func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _k2mini_frames(frame) -> list[tuple[str, str, str]]:
    """(file name, function, source line) of every k2mini frame on the stack, outermost first."""
    out = []
    while frame is not None:
        path = frame.f_code.co_filename
        found = ([None] + list(_PACKAGE.finditer(path)))[-1]  # the innermost package folder
        if found:
            line = linecache.getline(path, frame.f_lineno).strip()
            owner = type(frame.f_locals["self"]).__name__ if "self" in frame.f_code.co_varnames[:1] else ""
            name = f"{owner}.{frame.f_code.co_name}" if owner else frame.f_code.co_name
            out.append((path[found.end():], name, line))
        frame = frame.f_back
    return out[::-1]


def _where(frame) -> tuple[str, str]:
    frames = _k2mini_frames(frame)
    if not frames:
        return "outside k2mini", ""
    for _, func, _ in frames:
        if func.rsplit(".", 1)[-1] in _PHASES:
            inner = frames[-1]
            return _PHASES[func.rsplit(".", 1)[-1]], f"{inner[0]}:{inner[1]}"
    names = [f for _, f, _ in frames]
    file, func, line = frames[-1]
    if "train_step" in names and file == "training.py" and func == "train_step":
        if ".backward()" in line:
            return "backward", ""
        if "cross_entropy" in line:
            return "loss (cross-entropy)", ""
        return "train_step's own bookkeeping", line[:60]
    if any(f.endswith("forward") for f in names):
        base = file.rsplit(os.sep, 1)[-1]
        if base == "moe.py":
            if func == "expert_load":
                return "forward: telemetry", "expert_load (bincount per MoE layer)"
            part = "routing" if func in _MOE_ROUTING else (
                "routed experts" if func in _MOE_EXPERTS else "MoE glue, shared experts")
            return f"forward: {part}", func
        if base in _FORWARD_FILES:
            return f"forward: {_FORWARD_FILES[base]}", func
        if base == "model.py":
            if func.endswith("_check_ids"):
                return "forward: input checks", ""
            if "expert_load" in line or "RouterRecord" in line or "reshape(B, T" in line:
                return "forward: telemetry", line[:50]
            return "forward: embedding, lm_head, residuals, stack", line[:50]
        return f"forward: {base}", func
    return f"{file}:{func}", line[:60]


def op_census(fn) -> tuple[Counter, Counter]:
    """Run fn() under the census; ({(phase, detail): ops}, {(phase, op name): ops})."""
    census = _Census()
    with census:
        fn()
    return census.counts, census.ops


def by_phase(counts: Counter) -> Counter:
    out: Counter = Counter()
    for (phase, _), n in counts.items():
        out[phase] += n
    return out
