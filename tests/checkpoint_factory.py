"""K2-format checkpoints for the checkpoint tests, written WITHOUT k2mini.checkpoint: tensor names as
transformers saves them, files by the safetensors library, fp8 by a plain loop over 128x128 blocks.

So the reader is tested against an independent writer, and the writer against an independent reader.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

# hidden 160 and expert width 96 are not multiples of 128: most fp8 blocks are partial
PARTIAL_BLOCKS = dict(
    vocab_size=300, hidden_size=160, intermediate_size=200, moe_intermediate_size=96,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=136, kv_lora_rank=72,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=6, num_experts_per_tok=2,
    n_shared_experts=1, routed_scaling_factor=2.827, max_position_embeddings=512,
)

# Spelled out once more, on purpose apart from k2mini.checkpoint.names: the tensors K2 stores in fp8.
_FP8_SUFFIXES = (
    "self_attn.q_proj.weight", "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight",
)
_EXPERT = re.compile(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def k2_quantizes(name: str) -> bool:
    return name.endswith(_FP8_SUFFIXES) or bool(_EXPERT.search(name))


def reference_quantize(w: torch.Tensor, block: int = 128):
    """Per 128x128 block: s = max(amax, tiny) / 448, q = (W / s).to(float8_e4m3fn)."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            s[i, j] = max(blk.abs().max().item(), torch.finfo(torch.float32).tiny) / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def reference_dequantize(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """W[r, c] = float(q[r, c]) * s[r // 128, c // 128]."""
    out = q.to(torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= s[i, j]
    return out


def hf_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (large enough that routing and attention are not uniform), named as transformers
    saves a DeepseekV3ForCausalLM: one tensor per routed expert."""
    import tempfile

    import transformers
    from reference import random_hf_model

    model = random_hf_model(transformers.DeepseekV3Config(**config.to_hf()), seed=seed)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return dict(load_file(Path(d) / "model.safetensors"))


def write_checkpoint(directory, config, state, fp8: bool, shard_bytes: int, extra=None, model_type="kimi_k2"):
    """A K2-layout checkpoint: config.json, model-0000i-of-0000N.safetensors, index.

    Returns the state as a reader should serve it (fp8 tensors replaced by their dequantized values).
    extra: more tensors to store as they are (an MTP layer, rotary caches, ...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored, served = {}, {}
    for name, w in state.items():
        if fp8 and k2_quantizes(name):
            q, s = reference_quantize(w)
            stored[name], stored[name + "_scale_inv"] = q, s
            served[name] = reference_dequantize(q, s)
        else:
            stored[name] = served[name] = w
    stored.update(extra or {})
    shards, size = [{}], 0
    for name, t in stored.items():  # weight and its scale are adjacent, so they share a shard
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes and not name.endswith("_scale_inv"):
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in stored.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg = config.to_hf()
    cfg["model_type"] = model_type
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return served


def write_raw_safetensors(path, header: dict, data: bytes, length: int | None = None):
    """A safetensors file with an arbitrary (possibly invalid) header."""
    raw = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def shard_of(directory, name: str) -> Path:
    index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())
    return Path(directory) / index["weight_map"][name]


def header_of(path) -> tuple[dict, int]:
    """(header dict, data start) of a safetensors file, read with the struct module."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


_CACHE: dict = {}


def fp8_checkpoint():
    """Built once per test session: (fp8 K2 checkpoint dir, config, state as served, dir of a float32
    copy of the served state that transformers can load). The fp8 one has several shards, partial
    blocks, an MTP layer and rotary caches (both to be ignored)."""
    if "fp8" not in _CACHE:
        import atexit
        import shutil
        import tempfile

        from k2mini import K2Config

        root = Path(tempfile.mkdtemp(prefix="k2mini-ckpt-"))
        atexit.register(shutil.rmtree, root, True)
        config = K2Config(**PARTIAL_BLOCKS)
        state = hf_state(config, seed=3)
        g = torch.Generator().manual_seed(4)
        mtp = config.num_hidden_layers
        extra = {
            f"model.layers.{mtp}.eh_proj.weight": torch.randn(160, 320, generator=g).to(torch.float8_e4m3fn),
            f"model.layers.{mtp}.eh_proj.weight_scale_inv": torch.rand(2, 3, generator=g),
            f"model.layers.{mtp}.enorm.weight": torch.ones(160),
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(4, generator=g),
        }
        served = write_checkpoint(root / "fp8", config, state, fp8=True, shard_bytes=100_000, extra=extra)
        write_checkpoint(root / "dequantized", config, served, fp8=False, shard_bytes=2**40, model_type="deepseek_v3")
        _CACHE["fp8"] = (root / "fp8", config, served, root / "dequantized")
    return _CACHE["fp8"]


# ----------------------------------------------------------------- INT4 (compressed-tensors pack-quantized)
# What Kimi-K2-Thinking's config.json says, spelled out here apart from k2mini.checkpoint.int4.
K2_THINKING_QUANTIZATION = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                  "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                              "group_size": 32, "actorder": None, "dynamic": False,
                                              "observer": "minmax", "block_structure": None}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
}


def ct_args(num_bits: int = 4, group_size: int | None = 32):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=True, strategy=strategy, group_size=group_size)
    return args, QuantizationScheme(targets=["Linear"], weights=args)


def ct_compress(w: torch.Tensor, num_bits: int = 4, group_size: int | None = 32) -> dict[str, torch.Tensor]:
    """One bf16 matrix quantized (min-max scales by compressed-tensors' calculate_qparams) and packed by
    compressed-tensors' own PackedQuantizationCompressor: {weight_packed, weight_scale, weight_shape}."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args, scheme = ct_args(num_bits, group_size)
    w = w.to(torch.bfloat16)
    grouped = w.unflatten(1, (-1, group_size)) if group_size else w[:, None, :]
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    return dict(PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme))


def ct_dequantize(parts: dict[str, torch.Tensor], num_bits: int = 4, group_size: int | None = 32) -> torch.Tensor:
    """compressed-tensors' unpacking of one matrix, times its scale in float32 (the exact product;
    compressed-tensors' own dequantize multiplies in the scale's bf16)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args, _ = ct_args(num_bits, group_size)
    shape = torch.Size(int(v) for v in parts["weight_shape"])
    codes = unpack_from_int32(parts["weight_packed"], num_bits, shape)
    return dequantize(codes, parts["weight_scale"].float(), None, args, dtype=torch.float32)


def write_int4_checkpoint(directory, config, state, shard_bytes: int = 60_000, num_bits: int = 4,
                          group_size: int | None = 32, wrapper: bool = False, shape_dtypes=(torch.int32, torch.int64)):
    """A K2-Thinking-layout checkpoint: routed experts packed by compressed-tensors, everything else
    bf16 (the router's correction bias float32). An expert's three parts land in different shards
    (packed words by size, all scales in the second-to-last shard, all shapes in the last), and its
    weight_shape is int32 or int64 in turn. wrapper: the K2.5 layout (`language_model.` + text_config,
    with a vision tensor beside). Returns the state as a reader should serve it (float32)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    body, scales, shapes, served = {}, {}, {}, {}
    for i, (name, w) in enumerate(state.items()):
        if _EXPERT.search(name):
            parts = ct_compress(w, num_bits, group_size)
            base = name[: -len(".weight")]
            body[base + ".weight_packed"] = parts["weight_packed"]
            scales[base + ".weight_scale"] = parts["weight_scale"]
            shapes[base + ".weight_shape"] = parts["weight_shape"].to(shape_dtypes[i % len(shape_dtypes)])
            served[name] = ct_dequantize(parts, num_bits, group_size)
        else:
            body[name] = w if name.endswith("e_score_correction_bias") else w.to(torch.bfloat16)
            served[name] = body[name].float()
    prefix = "language_model." if wrapper else ""
    shards, size = [{}], 0
    for name, t in body.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    shards += [scales, shapes]
    if wrapper:
        shards[0]["vision_tower.patch_embed.weight"] = torch.ones(8, 3, dtype=torch.bfloat16)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        named = {(k if k.startswith("vision_tower.") else prefix + k): v.contiguous() for k, v in shard.items()}
        save_file(named, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in named})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    cfg = config.to_hf()
    cfg["model_type"] = "kimi_k2"
    q = json.loads(json.dumps(K2_THINKING_QUANTIZATION))
    q["config_groups"]["group_0"]["weights"].update(
        num_bits=num_bits, group_size=group_size, strategy="group" if group_size else "channel")
    cfg["quantization_config"] = q
    if wrapper:
        cfg = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"], "text_config": cfg,
               "vision_config": {"hidden_size": 8}}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return served


def int4_checkpoint():
    """Built once per test session: (K2-Thinking-layout INT4 dir, config, state as served, dir of a
    float32 copy that transformers can load). hidden 160 and expert width 96: multiples of 32 and 8,
    not of 64."""
    if "int4" not in _CACHE:
        import atexit
        import shutil
        import tempfile

        from k2mini import K2Config

        root = Path(tempfile.mkdtemp(prefix="k2mini-int4-"))
        atexit.register(shutil.rmtree, root, True)
        config = K2Config(**PARTIAL_BLOCKS)
        served = write_int4_checkpoint(root / "int4", config, hf_state(config, seed=7))
        write_checkpoint(root / "dequantized", config, served, fp8=False, shard_bytes=2**40, model_type="deepseek_v3")
        _CACHE["int4"] = (root / "int4", config, served, root / "dequantized")
    return _CACHE["int4"]
