"""load_pretrained: a HF-format checkpoint -> K2ForCausalLM, one tensor at a time."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import K2Config
from ..model import K2ForCausalLM
from ..rope import rope_frequencies
from .names import hf_names_for, is_ignored
from .reader import CheckpointError, CheckpointReader


def load_pretrained(source, dtype: torch.dtype = torch.float32, device="cpu", progress: bool = True) -> K2ForCausalLM:
    """Load a Kimi-K2 / Moonlight / DeepSeek-V3 style checkpoint into a K2ForCausalLM.

    The model is built on the meta device and each parameter is filled from the checkpoint, so peak
    memory is the model plus one tensor.
    """
    reader = source if isinstance(source, CheckpointReader) else CheckpointReader(source)
    try:
        config = K2Config.from_hf(reader.config)
    except ValueError as e:
        raise CheckpointError(f"{reader.source}/config.json: {e}") from None
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    E = config.n_routed_experts
    wanted = dict(model.named_parameters())
    wanted.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    expected_hf = set()
    with torch.no_grad():
        for name, target in tqdm(list(wanted.items()), desc="loading tensors", disable=not progress):
            parts = hf_names_for(name, E)
            expected_hf.update(parts)
            need = tuple(target.shape) if len(parts) == 1 else tuple(target.shape[1:])
            for i, part in enumerate(parts):
                value = reader.get(part, dtype=target.dtype)
                if tuple(value.shape) != need:
                    raise CheckpointError(
                        f"{reader.source}: tensor {part} has shape {tuple(value.shape)}, the config needs {need}"
                    )
                (target if len(parts) == 1 else target[i]).copy_(value)
    unexpected = [
        k
        for k in reader.keys()
        if k not in expected_hf and not is_ignored(k, config.num_hidden_layers) and not k.endswith("_scale_inv")
    ]
    if unexpected:
        raise CheckpointError(f"{reader.source}: tensors the config does not explain, e.g. {unexpected[:3]}")
    inv_freq, _ = rope_frequencies(config)
    model.inv_freq = inv_freq.to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
