"""Peak memory of stream_activations on a generated K2-layout fp8 checkpoint of several GB.

The checkpoint has Kimi-K2's layout and vocabulary (fp8 128x128-block attention and FFN matrices,
bf16 embeddings / lm_head / norms / router, float32 correction bias, sharded safetensors + index) and
384 experts (top-8, 1 shared) per MoE layer, but few and narrower layers: ~6.2 GB. It is generated
tensor by tensor, in chunks (the generator stays small), into data/bench/ and reused afterwards.

Each measurement runs in a fresh process and reports its peak RSS (VmHWM): a process that only
imports torch and k2mini (the baseline), the router-only static summary, and streaming B x T random
tokens through every layer (which reads every routed expert that receives tokens, i.e. nearly all of
them). The design bound is baseline + 2 x the largest layer piece in float32 + the activations
(`k2mini.analysis.stream.memory_estimate`); the script fails if streaming exceeds it.

    python benchmarks/bench_stream_memory.py [--batch 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import encode_header, print_table, tensor_bytes  # noqa: E402

from k2mini import K2Config  # noqa: E402
from k2mini.analysis.params import hf_tensor_shapes, layout_bytes  # noqa: E402
from k2mini.checkpoint import K2_QUANTIZATION_CONFIG  # noqa: E402
from k2mini.checkpoint.fp8 import scale_shape  # noqa: E402
from k2mini.checkpoint.names import is_fp8_quantized, scale_name  # noqa: E402

# K2's vocabulary, routing (384 experts, top-8, 1 shared, scaling 2.827) and fp8 format; 3 layers.
CONFIG = dict(
    K2Config.preset("kimi-k2").to_dict(),
    hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024, num_hidden_layers=3,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, rope_scaling=None, max_position_embeddings=4096,
)
SHARD_BYTES = 2**30
SEED = 0
WEIGHT_STD = 0.02
ROW_CHUNK = 8192  # rows of a bf16 matrix generated at a time


def recipe_key() -> str:
    recipe = {"config": CONFIG, "shard_bytes": SHARD_BYTES, "seed": SEED, "std": WEIGHT_STD, "version": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_path() -> Path:
    return ROOT / "data" / "bench" / f"k2-layout-{recipe_key()}"


# ---------------------------------------------------------------------------------------- generation
def plan(config: K2Config) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every stored tensor, fp8 weights followed by their scales."""
    entries = []
    for name, shape in hf_tensor_shapes(config):
        if is_fp8_quantized(name):
            entries += [(name, "F8_E4M3", shape), (scale_name(name), "F32", scale_shape(shape))]
        elif name.endswith("e_score_correction_bias"):
            entries.append((name, "F32", shape))
        else:
            entries.append((name, "BF16", shape))
    return entries


class Source:
    """Tensor bytes on demand. fp8 matrices come from a small pool of random e4m3 matrices per shape
    (each with its own random block scales), so generating 6 GB costs little more than writing it."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.pool: dict[tuple, list[torch.Tensor]] = {}
        self.count = 0

    def fp8(self, shape):
        pool = self.pool.setdefault(shape, [])
        if len(pool) < 4:
            q = (torch.randn(shape, generator=self.g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
            pool.append(q)
        self.count += 1
        return pool[self.count % len(pool)]

    def chunks(self, name, dtype, shape):
        if dtype == "F8_E4M3":
            yield tensor_bytes(self.fp8(shape))
        elif name.endswith("_scale_inv"):  # dequantized weights ~ N(0, WEIGHT_STD^2)
            s = (WEIGHT_STD / 64) * (0.5 + torch.rand(shape, generator=self.g))
            yield tensor_bytes(s)
        elif name.endswith("e_score_correction_bias"):
            yield tensor_bytes(3.0 + 0.01 * torch.randn(shape, generator=self.g))  # DeepSeek-like offset
        elif "norm" in name:
            yield tensor_bytes(torch.ones(shape, dtype=torch.bfloat16))
        else:
            rows = shape[0]
            for a in range(0, rows, ROW_CHUNK):
                b = min(rows, a + ROW_CHUNK)
                yield tensor_bytes((torch.randn((b - a, *shape[1:]), generator=self.g) * WEIGHT_STD).to(torch.bfloat16))


def generate(path: Path) -> Path:
    """Write the checkpoint into a temporary directory beside `path`, then rename it into place."""
    config = K2Config(**CONFIG)
    entries = plan(config)
    shards, size = [[]], 0
    for e in entries:
        n = math.prod(e[2]) * torch.tensor([], dtype=_dtype(e[1])).element_size()
        if shards[-1] and size + n > SHARD_BYTES and not e[0].endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        src, weight_map, t0 = Source(SEED), {}, time.perf_counter()
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with open(tmp / fname, "wb") as f:
                f.write(encode_header(shard))
                for name, dtype, shape in shard:
                    for chunk in src.chunks(name, dtype, shape):
                        f.write(chunk)
                    weight_map[name] = fname
            print(f"  wrote {fname} ({(tmp / fname).stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)", flush=True)
        hf = config.to_hf()
        hf["model_type"] = "kimi_k2"
        hf["quantization_config"] = dict(K2_QUANTIZATION_CONFIG)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        total = sum((tmp / s).stat().st_size for s in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _dtype(name):
    from k2mini.checkpoint.safetensors_format import DTYPES

    return DTYPES[name]


# ---------------------------------------------------------------------------------------- measuring
def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: on Linux that carries over the parent's
    resident set from before exec, so a small child would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: the best available


def child(mode: str, path: str, batch: int, seq_len: int) -> None:
    """Runs in a fresh process; prints one JSON line."""
    torch.set_num_threads(2)
    import k2mini.analysis as analysis

    out = {"mode": mode}
    t = time.perf_counter()
    if mode == "static":
        df = analysis.router_summary(path, progress=False)
        out.update(bytes_read=df.attrs["bytes_read"], checkpoint_bytes=df.attrs["checkpoint_bytes"])
    elif mode == "stream":
        config = K2Config(**CONFIG)
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(SEED))
        r = analysis.stream_activations(path, ids, progress=False)
        out.update(bytes_read=r.bytes_read, checkpoint_bytes=r.checkpoint_bytes, experts_loaded=r.experts_loaded,
                   finite=bool(r.hidden.isfinite().all()), unused=r.layer_frame()["unused_experts"].tolist())
    out.update(seconds=time.perf_counter() - t, peak_rss=peak_rss())
    print(json.dumps(out))


def run_child(mode, path, batch, seq_len) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--batch", str(batch), "--seq-len", str(seq_len)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.path, args.batch, args.seq_len)
        return 0

    from k2mini.analysis.stream import memory_estimate

    path = checkpoint_path()
    if not (path / "model.safetensors.index.json").exists():
        print(f"generating {path} (once) ...", flush=True)
        generate(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    config = K2Config(**CONFIG)
    print(f"checkpoint: {path} ({size / 1e9:.2f} GB, {config.n_routed_experts} experts x "
          f"{config.n_moe_layers} MoE layers, top-{config.num_experts_per_tok})")

    base = run_child("baseline", path, args.batch, args.seq_len)
    static = run_child("static", path, args.batch, args.seq_len)
    stream = run_child("stream", path, args.batch, args.seq_len)
    est = memory_estimate(config, args.batch, args.seq_len)
    bound = base["peak_rss"] + 2 * est["largest_piece"] + est["activations"]
    mb = 2**20
    rows = [
        ("imports only (baseline)", f"{base['peak_rss'] / mb:.0f}", "", "", ""),
        ("router_summary (static)", f"{static['peak_rss'] / mb:.0f}", f"{static['bytes_read'] / 1e6:.2f} MB",
         f"{static['bytes_read'] / size:.4%}", f"{static['seconds']:.1f}"),
        (f"stream_activations {args.batch}x{args.seq_len} tokens", f"{stream['peak_rss'] / mb:.0f}",
         f"{stream['bytes_read'] / 1e9:.2f} GB", f"{stream['bytes_read'] / size:.1%}", f"{stream['seconds']:.1f}"),
    ]
    print_table(rows, ("run", "peak RSS MiB", "read", "of checkpoint", "seconds"))
    k2 = layout_bytes(K2Config.preset("kimi-k2"))
    print(f"experts loaded per MoE layer: {stream['experts_loaded']} of {config.n_routed_experts}; "
          f"hidden states finite: {stream['finite']}")
    print(f"design bound: baseline {base['peak_rss'] / mb:.0f} + 2 x largest piece {est['largest_piece'] / mb:.0f} "
          f"({est['largest_name']}) + activations {est['activations'] / mb:.0f} = {bound / mb:.0f} MiB")
    print(f"checkpoint size / streaming peak RSS: {size / stream['peak_rss']:.1f}x "
          f"({size / 1e9:.2f} GB through {stream['peak_rss'] / 1e9:.2f} GB)")
    print(f"Kimi-K2 layout (computed from its config): router weights + biases = {k2['router'] / 1e6:.1f} MB "
          f"of {sum(k2.values()) / 1e12:.3f} TB = {k2['router'] / sum(k2.values()):.4%}")
    ok = stream["peak_rss"] <= bound and stream["finite"]
    print("PASS" if ok else "FAIL: streaming peak RSS above the design bound")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
