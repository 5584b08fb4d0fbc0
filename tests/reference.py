"""Building transformers' DeepseekV3 reference models for parity tests."""

from __future__ import annotations

import torch


def random_hf_model(hf_config, seed: int = 0, std: float = 0.15, bias_std: float = 0.05):
    """A DeepseekV3ForCausalLM with weights large enough that attention and routing are far from uniform."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config).eval()
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
