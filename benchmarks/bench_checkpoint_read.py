"""Reading a quantized checkpoint: throughput of read + dequantize against reading the same bytes raw,
the safetensors library's own reader against k2mini's, and peak memory against the largest tensor.

    .venv/bin/python benchmarks/bench_checkpoint_read.py [--format fp8|int4] [--size-gb 2.2] [--repeats 3] [--cold]

The first run writes a checkpoint (Moonlight-sized matrices: hidden 2048, 64 experts of width 1408 per
layer) under data/bench/, one shard in memory at a time, by the safetensors library; later runs reuse
it. --format fp8: K2's layout (every Linear fp8 with 128x128 block scales, other tensors bf16);
--format int4: K2-Thinking's (routed experts compressed-tensors pack-quantized INT4, one bf16 scale
per 32 columns, everything else bf16).

Why k2mini reads local files itself rather than through `safetensors.safe_open`: the row "safe_open,
stored dtype" reads every tensor with the library (get_tensor, memory-mapped, then copied out of the
map) and is measured against "reader, stored dtype"; k2mini's reader reads each tensor straight into
its destination with one read() into memory it owns (no page-fault per 4 KiB page of a map, no second
copy), hints the kernel about the next tensors, and shares its validated header parser with the remote
reader, which must parse headers from byte ranges anyway. Figures in the README.

By default every pass runs warm (the files sit in the page cache, which a first untimed pass fills), so
"raw" is the speed of copying cached file bytes: the hardest baseline. With --cold, the checkpoint's
pages are evicted from the page cache (posix_fadvise DONTNEED, this checkpoint's files only) before
every pass, raw and dequantized alike, so both read from the disk.

What to expect on 2 cores: dequantizing writes 4 (float32) or 2 (bfloat16) bytes per fp8 byte read,
through a handful of vectorized torch passes (~1.1-1.4 G elements/s here), so it keeps up with a cold
read better than with a warm one, which is a cache-resident memcpy. On a machine whose CPUs other
processes keep busy, torch's 2-thread parallel regions stall; --threads 1 is then much faster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from k2mini import K2Config
from k2mini.analysis.params import hf_tensor_shapes
from k2mini.checkpoint import K2_THINKING_QUANTIZATION_CONFIG, CheckpointReader
from k2mini.checkpoint.fp8 import scale_shape
from k2mini.checkpoint.int4 import PackScheme
from k2mini.checkpoint.names import EXPERT_RE, is_fp8_quantized, scale_name
from k2mini.checkpoint.safetensors_format import DTYPES
from k2mini.checkpoint.save import K2_QUANTIZATION_CONFIG, write_safetensors

ROOT = Path(__file__).resolve().parent.parent / "data" / "bench"
SHARD_BYTES = 512 * 2**20


def bench_config(size_gb: float, fmt: str = "fp8") -> K2Config:
    expert_bytes = 3 * 2048 * 1408 * (1 if fmt == "fp8" else 0.5 + 2 / 32)  # one fp8 / packed INT4 expert
    layers = max(1, round(size_gb * 1e9 / (64 * expert_bytes)))
    return K2Config(
        vocab_size=16384, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=layers + 1, first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        quantization_config=dict(K2_QUANTIZATION_CONFIG) if fmt == "fp8" else K2_THINKING_QUANTIZATION_CONFIG,
    )


def plan(config: K2Config) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in the HF per-expert layout, from a model on meta."""
    out = []
    int4 = config.quantization_config["quant_method"] == "compressed-tensors"
    for hf, shape in hf_tensor_shapes(config):
        if int4 and EXPERT_RE.match(hf):
            base, scheme = hf[: -len(".weight")], PackScheme()
            out += [(base + ".weight_packed", "I32", scheme.packed_shape(shape)),
                    (base + ".weight_scale", "BF16", scheme.scale_shape(shape)), (base + ".weight_shape", "I32", (2,))]
        elif not int4 and is_fp8_quantized(hf):
            out += [(hf, "F8_E4M3", shape), (scale_name(hf), "F32", scale_shape(shape))]
        else:
            out.append((hf, "F32" if hf.endswith("correction_bias") else "BF16", shape))
    return out


def random_tensor(name: str, dtype: str, shape, g: torch.Generator) -> torch.Tensor:
    if dtype == "I32" and name.endswith("weight_shape"):
        return torch.tensor(shape, dtype=torch.int32)  # overwritten below with the matrix's (out, in)
    if dtype == "I32":  # packed words: every bit pattern is 8 valid INT4 codes
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=g)
    if dtype == "BF16" and name.endswith("weight_scale"):
        return (torch.rand(shape, generator=g) * 1e-3 + 1e-5).to(torch.bfloat16)
    if dtype == "F8_E4M3":  # any finite code: magnitude below 0x7F (NaN), random sign
        mag = torch.randint(0, 0x7F, shape, dtype=torch.uint8, generator=g)
        sign = torch.randint(0, 2, shape, dtype=torch.uint8, generator=g) << 7
        return (mag | sign).view(torch.float8_e4m3fn)
    if dtype == "F32" and len(shape) == 2:  # block scales
        return torch.rand(shape, generator=g) * 1e-3 + 1e-5
    return (torch.randn(shape, generator=g) * 0.02).to(DTYPES[dtype])


def generate(path: Path, config: K2Config):
    """Write the checkpoint shard by shard into a temporary directory, then rename it into place."""
    entries = plan(config)
    unpacked = {e[0].replace(".weight_packed", ".weight_shape"): (e[2][0], e[2][1] * 8) for e in entries if e[0].endswith("_packed")}
    shards, size = [[]], 0
    for e in entries:
        n = math.prod(e[2]) * DTYPES[e[1]].itemsize
        if shards[-1] and size + n > SHARD_BYTES and not e[0].endswith(("_scale_inv", "_scale", "_shape")):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"  writing {name} ({len(shard)} tensors)", flush=True)
        tensors = {tname: random_tensor(tname, dtype, shape, g) for tname, dtype, shape in shard}
        tensors.update({k: torch.tensor(v, dtype=torch.int32) for k, v in unpacked.items() if k in tensors})
        write_safetensors(tmp / name, tensors)
        del tensors
        weight_map.update({e[0]: name for e in shard})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    cfg = config.to_hf()
    cfg["model_type"] = "kimi_k2"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


class PeakRSS:
    """Peak resident memory above the level at start, sampled every millisecond by a thread."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.extra = self.peak - self.base


def evict(files):
    """Drop these files' pages from the page cache (clean pages only; other files untouched)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_raw_files(files, buf: bytearray, ahead: int = 16 * 2**20) -> int:
    """Every byte of every file, through one reused buffer, each file declared sequential and the
    next `ahead` bytes requested once per `ahead` bytes read: the fastest plain read we found, warm
    or cold, so the reader is not compared against a baseline that waits on the disk needlessly."""
    total, view = 0, memoryview(buf)
    advise = getattr(os, "posix_fadvise", None)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            fd, pos, hinted = f.fileno(), 0, 0
            if advise:
                advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while True:
                if advise and pos >= hinted:
                    advise(fd, pos, 2 * ahead, os.POSIX_FADV_WILLNEED)
                    hinted = pos + ahead
                n = f.readinto(view)
                if not n:
                    break
                pos += n
                total += n
    return total


def read_safe_open(path: Path) -> int:
    """Every tensor in file order through the safetensors library (safe_open, get_tensor), discarded."""
    from safetensors import safe_open

    n = 0
    with CheckpointReader(path) as reader:
        groups = reader.group_by_shard(reader.stored_keys())
    for shard, names in groups.items():
        with safe_open(path / shard, "pt") as f:
            for name in names:  # get_tensor maps the file; the clone reads it into memory of its own,
                t = f.get_tensor(name).clone()  # as k2mini's reader does (fresh memory, like its row above)
                n += t.numel()
                del t
    return n


def read_tensors(path: Path, dtype, reuse: bool = False, hints: bool = True) -> int:
    """Every tensor in file order, one at a time, discarded after use. reuse: into one preallocated
    buffer, as load_pretrained reads into parameters that already exist (no fresh pages to fault in).
    hints: tell the reader which tensor comes next, as load_pretrained and iter_tensors do."""
    n = 0
    with CheckpointReader(path) as reader:
        names = [name for group in reader.group_by_shard(reader.keys()).values() for name in group]
        buf = torch.empty(max(math.prod(reader.shape(k)) for k in names), dtype=dtype) if reuse else None
        for name in reader.read_ahead(names, window=32 * 2**20 if hints else 0):
            if dtype is None and reader.is_packed(name):
                for part in ("_packed", "_scale", "_shape"):
                    n += reader.read_raw(name + part).numel()
                continue
            if dtype is None:
                t = reader.read_raw(name)
            elif reuse:
                t = reader.get(name, out=buf[: math.prod(reader.shape(name))].view(reader.shape(name)))
            else:
                t = reader.get(name, dtype)
            n += t.numel()
            del t
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=("fp8", "int4"), default="fp8", help="K2's fp8 or K2-Thinking's INT4 experts")
    ap.add_argument("--size-gb", type=float, default=2.2, help="quantized expert bytes to generate (default 2.2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per row; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each pass")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(args.size_gb, args.format)
    key = hashlib.sha256(json.dumps(plan(config)).encode()).hexdigest()[:12]
    path = ROOT / f"{args.format}-{key}"
    if not (path / "config.json").exists():
        print(f"generating {path} (once) ...", flush=True)
        generate(path, config)
    files = sorted(path.iterdir())
    total = sum(p.stat().st_size for p in files)
    with CheckpointReader(path) as reader:
        largest = max(reader.keys(), key=lambda n: math.prod(reader.shape(n)))
        largest_f32 = math.prod(reader.shape(largest)) * 4
        n_quantized = sum(reader.is_fp8(n) or reader.is_packed(n) for n in reader.keys())
        n_tensors = len(reader.keys())
    print(f"checkpoint: {path}  {total / 1e9:.2f} GB in {len(files)} files, {n_tensors} tensors ({n_quantized} {args.format})")
    print(f"largest tensor: {largest} {reader.shape(largest)}: {largest_f32 / 2**20:.0f} MiB as float32")
    load = os.getloadavg()[0]
    busy = " (other processes compete for the CPUs)" if load > os.cpu_count() else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.1f}{busy}")

    buf = bytearray(2**20)  # 1 MiB: stays in cache, the fastest raw read here
    if args.cold:
        os.sync()  # written pages must be clean to be evictable
    else:
        read_raw_files(files, buf)  # fill the page cache: every pass below is warm
    rows = [
        ("raw file bytes (1 MiB buffer, read-ahead)", lambda: read_raw_files(files, buf)),
        ("reader, stored dtype (no dequant)", lambda: read_tensors(path, None)),
        ("safe_open + copy, stored dtype (library)", lambda: read_safe_open(path)),
        ("reader + dequantize to float32", lambda: read_tensors(path, torch.float32)),
        ("  the same, without read-ahead hints", lambda: read_tensors(path, torch.float32, hints=False)),
        ("reader + dequantize to bfloat16", lambda: read_tensors(path, torch.bfloat16)),
        ("  the same, into a reused float32 buffer", lambda: read_tensors(path, torch.float32, reuse=True)),
        ("  the same, into a reused bfloat16 buffer", lambda: read_tensors(path, torch.bfloat16, reuse=True)),
    ]
    results = {}
    for label, fn in rows:  # interleaved repeats, so drift in machine load hits every row alike
        results[label] = []
    for _ in range(args.repeats):
        for label, fn in rows:
            if args.cold:
                evict(files)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
            results[label].append((dt, mem.extra))
    raw = statistics.median(dt for dt, _ in results[rows[0][0]])
    print()
    print(f"{'pass (all cold)' if args.cold else 'pass (all warm)':46s} {'GB/s':>7s} {'vs raw':>7s} {'peak RSS over start':>20s}")
    for label, _ in rows:
        dt = statistics.median(d for d, _ in results[label])
        peak = max(m for _, m in results[label])
        print(f"{label:46s} {total / dt / 1e9:7.2f} {raw / dt:7.2f} {peak / 2**20:15.0f} MiB")
    print(f"\npeak memory bound: largest tensor as float32 = {largest_f32 / 2**20:.0f} MiB, plus the reader's 16 MiB read buffer")
    print("(GB/s counts checkpoint file bytes; the reused-buffer rows hold that buffer, sized to the largest tensor)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
