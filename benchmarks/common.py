"""Timing helpers shared by the benchmark scripts (best-of-N wall time, interleaved candidates)."""

from __future__ import annotations

import time


def best_times(candidates: dict, repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Best wall time in seconds of each zero-argument callable, runs interleaved round-robin so
    that background load affects every candidate alike."""
    for f in candidates.values():
        for _ in range(warmup):
            f()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, f in candidates.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def print_table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


# ----------------------------------------------------------------- streamed safetensors files
# bench_stream_memory generates a checkpoint larger than it may hold, row block by row block; the
# safetensors library writes a whole file from tensors in memory, so that generator writes the
# (simple) format itself. k2mini's own files are written by the library (k2mini/checkpoint/save.py).


def encode_header(entries, metadata=None) -> bytes:
    """Length prefix + JSON header for (name, safetensors dtype, shape) tensors written back to back."""
    import json
    import math

    from k2mini.checkpoint.safetensors_format import DTYPES

    header = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data area starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t) -> memoryview:
    """A tensor's raw bytes (CPU, contiguous) as safetensors stores them."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(__import__("torch").uint8).numpy())
