"""Layer pieces on demand: fill one of the model's own modules from a checkpoint, use it, free it.

A `DecoderLayer` is built on the meta device (shapes, no memory). Its submodules (norms, attention,
router, shared experts, a dense FFN) are materialized one at a time with `load_piece`, which reads each
tensor straight into its parameter (fp8 dequantized on read), and dropped with `free_piece`. Routed
experts are never materialized as a stack: `load_expert` reads one expert's three matrices.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from ..checkpoint.names import expert_hf_name


def meta_layer(config, index: int):
    """The model's DecoderLayer `index`, on the meta device."""
    from ..model import DecoderLayer

    with torch.device("meta"):
        return DecoderLayer(config, index)


def piece_tensors(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a module's parameters and persistent buffers (the router's bias)."""
    named = chain(module.named_parameters(), module.named_buffers())
    return [(prefix + name, t) for name, t in named]


def check_piece(reader, module: nn.Module, prefix: str) -> None:
    """Every tensor of a piece present, floating-point and of the module's shape (no data read)."""
    for hf, t in piece_tensors(module, prefix):
        reader.check(hf, shape=t.shape, floating=True)


@torch.no_grad()
def load_piece(reader, module: nn.Module, prefix: str) -> nn.Module:
    """Allocate `module` (meta -> cpu, its dtypes kept) and read its tensors from the checkpoint."""
    module.to_empty(device="cpu")
    for hf, t in piece_tensors(module, prefix):
        reader.get(hf, out=t.detach())
    return module


def free_piece(module: nn.Module) -> None:
    """Return a piece's storage: its tensors go back to the meta device."""
    module.to_empty(device="meta")


def piece_bytes(module: nn.Module) -> int:
    """Bytes a piece occupies once materialized."""
    return sum(t.numel() * t.element_size() for _, t in piece_tensors(module, ""))


def load_expert(reader, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One routed expert's (gate (I, H), up (I, H), down (H, I)) in float32, dequantized."""
    w = reader.get_expert(layer, expert, torch.float32)
    return w["gate_proj"], w["up_proj"], w["down_proj"]


def check_experts(reader, layer: int, n_experts: int, hidden: int, width: int) -> None:
    shapes = {"gate_proj": (width, hidden), "up_proj": (width, hidden), "down_proj": (hidden, width)}
    for e in range(n_experts):
        for proj, shape in shapes.items():
            reader.check(expert_hf_name(layer, e, proj), shape=shape, floating=True)
