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
