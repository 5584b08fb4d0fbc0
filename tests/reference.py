"""Building transformers' DeepseekV3 reference models for parity tests."""

from __future__ import annotations

import torch


def randomize_(model, seed: int = 0, std: float = 0.15, bias_std: float = 0.05):
    """Weights large enough that attention and routing are far from uniform, in place: norms in
    [0.5, 1.5), other parameters N(0, std^2), correction biases N(0, bias_std^2). Works on a
    transformers DeepseekV3 model and on a K2ForCausalLM alike (the same parameter names)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * bias_std)
    return model


def random_hf_model(hf_config, seed: int = 0, std: float = 0.15, bias_std: float = 0.05):
    """A DeepseekV3ForCausalLM randomized by `randomize_`."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    return randomize_(DeepseekV3ForCausalLM(hf_config).eval(), seed, std, bias_std)
