"""load_pretrained: a HF-format checkpoint (bf16/fp32, fp8 with block scales, or INT4 experts in
compressed-tensors' pack-quantized format; local or remote) -> K2ForCausalLM, shard by shard.

Everything is checked before any tensor data is read: the config, every expected tensor's presence,
dtype and shape (against the config), fp8 scales and INT4 parts (packed words, scales and the
2-number `weight_shape`), and that the checkpoint holds nothing unexplained.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import K2Config
from ..model import K2ForCausalLM
from ..rope import rope_frequencies
from .names import hf_tensors, is_ignored, is_scale
from .reader import INDEX, CheckpointError, CheckpointReader


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
    with torch.device("meta"):
        model = K2ForCausalLM(config).to(dtype)
    for layer in model.moe_layers():
        layer.mlp.gate.e_score_correction_bias = layer.mlp.gate.e_score_correction_bias.float()
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gave the head its own tensor; tie it again before planning
        model.lm_head.weight = model.model.embed_tokens.weight
    plan = hf_tensors(model)  # (hf_name, destination tensor sharing the model's storage); a tied head once
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
    for hf, dst in plan:  # every header, dtype, shape and fp8 scale, before any data is read
        reader.check(hf, shape=dst.shape, floating=True)

    destination = dict(plan)
    with torch.no_grad():
        groups = reader.group_by_shard(expected)
        for shard, names in tqdm(groups.items(), desc="loading shards", unit="shard", disable=not progress):
            for hf in reader.read_ahead(names):  # the next tensors load while this one is converted
                reader.get(hf, out=destination[hf])
    inv_freq, _ = rope_frequencies(config)
    model.inv_freq = inv_freq.to(device)
    return model.eval()
