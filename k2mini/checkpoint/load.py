"""load_pretrained: a HF-format checkpoint (bf16/fp32, fp8 with block scales, or INT4 experts in
compressed-tensors' pack-quantized format; local or remote) -> K2ForCausalLM, shard by shard.

Everything is checked before any tensor data is read: the config, every expected tensor's presence,
dtype and shape (against the config), fp8 scales and INT4 parts (packed words, scales and the
2-number `weight_shape`), and that the checkpoint holds nothing unexplained. Before the model is even
built (on the meta device, which for a million layers alone takes minutes), the config's sizes are
checked against the checkpoint's own tensors (the embedding's shape, the layers the index names), and
a model that cannot fit in the memory available is refused by name.
"""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from ..config import K2Config
from ..model import K2ForCausalLM
from ..rope import rope_frequencies
from .names import hf_tensors, is_ignored, is_scale, layer_of
from .reader import CONFIG, INDEX, CheckpointError, CheckpointReader
from .save import repair_before_load


def load_pretrained(
    source, dtype: torch.dtype = torch.float32, device="cpu", progress: bool = True, fs=None,
    timeout: float | None = None,
) -> K2ForCausalLM:
    """Load a Kimi-K2 / K2-Thinking / K2.5 (text) / Moonlight / DeepSeek-V3 style checkpoint into a K2ForCausalLM.

    source: a checkpoint directory, `hf://owner/repo[@revision]`, an http(s) URL of the directory, or
    an open CheckpointReader. fp8 and INT4 weights are dequantized to `dtype` on read; the router's
    correction bias stays float32. timeout: seconds an HTTP read may go without progress (see
    CheckpointReader). The model is built on the meta device and each tensor is read straight into its
    parameter, so peak memory is the model plus a fixed read buffer.
    """
    own = not isinstance(source, CheckpointReader)
    if own and isinstance(source, (str, os.PathLike)) and "://" not in os.fspath(source):
        repair_before_load(source)  # a save killed between its two renames left the checkpoint aside
    reader = CheckpointReader(source, fs=fs, timeout=timeout) if own else source
    try:
        return _load(reader, dtype, device, progress)
    finally:
        if own:
            reader.close()


def _load(reader: CheckpointReader, dtype, device, progress) -> K2ForCausalLM:
    try:
        config = K2Config.from_hf(reader.config)
    except ValueError as e:
        raise CheckpointError(f"{reader.files.url('config.json')}: {e}") from None
    check_sizes(reader, config)  # before building: a million layers take minutes even on the meta device
    with torch.device("meta"):
        model = K2ForCausalLM(config).to(dtype)
    for layer in model.moe_layers():
        layer.mlp.gate.e_score_correction_bias = layer.mlp.gate.e_score_correction_bias.float()
    expected = _check_tensors(reader, config, hf_tensors(model))  # on the meta model: nothing allocated yet
    check_memory(config, dtype, device, reader.files.url(CONFIG))
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gave the head its own tensor; tie it again before planning
        model.lm_head.weight = model.model.embed_tokens.weight
    plan = hf_tensors(model)  # (hf_name, destination tensor sharing the model's storage); a tied head once

    destination = dict(plan)
    with torch.no_grad():
        groups = reader.group_by_shard(expected)
        for shard, names in tqdm(groups.items(), desc="loading shards", unit="shard", disable=not progress):
            for hf in reader.read_ahead(names):  # the next tensors load while this one is converted
                reader.get(hf, out=destination[hf])
    inv_freq, _ = rope_frequencies(config)
    model.inv_freq = inv_freq.to(device)
    return model.eval()


def _check_tensors(reader: CheckpointReader, config: K2Config, plan) -> set[str]:
    """Every tensor the config needs is there, nothing unexplained is, and every header, dtype, shape and
    fp8 scale fits (`plan` may be the meta model's): before any data is read. Returns the names."""
    missing = [hf for hf, _ in plan if hf not in reader]
    if missing:
        raise CheckpointError(
            f"{reader.files.url(INDEX)}: {len(missing)} tensors the config needs are missing, e.g. {missing[:3]}"
        )
    expected = {hf for hf, _ in plan}
    unexpected = [
        k
        for k in reader.keys()
        if k not in expected and not is_ignored(k, config.num_hidden_layers) and not is_scale(k)
        and not (config.tie_word_embeddings and k == "lm_head.weight")  # transformers ignores it too
    ]
    if unexpected:
        raise CheckpointError(f"{reader.source}: tensors the config does not explain, e.g. {unexpected[:3]}")
    for hf, dst in plan:
        reader.check(hf, shape=dst.shape, floating=True)
    return expected


def check_sizes(reader: CheckpointReader, config: K2Config) -> None:
    """CheckpointError if config.json's sizes disagree with the tensors the checkpoint holds: the
    embedding's (vocab_size, hidden_size), a router's (n_routed_experts, hidden_size), and
    num_hidden_layers against the layers the index names.
    Runs before the model is built, so that a wrong size fails at once instead of after building it."""
    where = reader.files.url(CONFIG)
    embed = "model.embed_tokens.weight"
    if embed in reader:
        shape = tuple(reader.shape(embed))
        if shape != (config.vocab_size, config.hidden_size):
            raise CheckpointError(
                f"{where}: vocab_size {config.vocab_size} and hidden_size {config.hidden_size} disagree with the "
                f"checkpoint: {embed} has shape {list(shape)} (vocab_size, hidden_size)"
            )
    layers = {layer_of(k) for k in reader.keys()} - {None}
    routers = sorted(k for k in reader.keys() if k.endswith(".mlp.gate.weight") and layer_of(k) is not None)
    if routers and config.n_routed_experts:  # one router says how many experts every MoE layer has
        shape = tuple(reader.shape(routers[0]))
        if shape != (config.n_routed_experts, config.hidden_size):
            raise CheckpointError(
                f"{where}: n_routed_experts {config.n_routed_experts} and hidden_size {config.hidden_size} disagree "
                f"with the checkpoint: {routers[0]} has shape {list(shape)} (n_routed_experts, hidden_size)"
            )
    named = max(layers) + 1 if layers else 0
    if config.num_hidden_layers > named:
        raise CheckpointError(
            f"{where}: num_hidden_layers is {config.num_hidden_layers}, but the checkpoint's tensors name "
            f"{len(layers)} layers (model.layers.0 to model.layers.{named - 1})" if layers else
            f"{where}: num_hidden_layers is {config.num_hidden_layers}, but the checkpoint names no model.layers.* tensor"
        )


def available_memory(device, swap: bool = True) -> int | None:
    """Bytes that can still be allocated on `device` (CPU: MemAvailable, + SwapFree unless `swap` is False),
    or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemAvailable"] + (info.get("SwapFree", 0) if swap else 0)
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config: K2Config, dtype: torch.dtype, device, where: str) -> None:
    """MemoryError, before anything is allocated, if the model's parameters alone (param_counts, at
    `dtype`) exceed the memory available on `device`."""
    params = config.param_counts()["total"]
    need = params * torch.empty((), dtype=dtype).element_size()
    have = available_memory(device)
    if have is not None and need > have:
        raise MemoryError(
            f"{where}: this config (num_hidden_layers={config.num_hidden_layers}, hidden_size={config.hidden_size}, "
            f"n_routed_experts={config.n_routed_experts}, vocab_size={config.vocab_size}) has {params:,} parameters, "
            f"{need / 2**30:,.1f} GiB in {str(dtype).removeprefix('torch.')}: more than the {have / 2**30:,.1f} GiB "
            f"available on {torch.device(device)}; load it as bfloat16, on a larger machine, or analyse it streaming "
            "(k2mini.analysis)"
        )
