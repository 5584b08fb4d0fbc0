"""Checkpoints in the Hugging Face layout (the only place that knows HF tensor names, sharding, fp8 block
scales, compressed-tensors' packed INT4, and where bytes come from: local directories, hf:// or http(s)
through fsspec)."""

from .fp8 import dequantize_fp8, quantize_fp8
from .int4 import K2_THINKING_QUANTIZATION_CONFIG, dequantize_packed, quantize_packed
from .load import load_pretrained
from .reader import CheckpointError, CheckpointReader
from .save import K2_QUANTIZATION_CONFIG, save_pretrained
from .sources import NetworkError

__all__ = [
    "load_pretrained",
    "save_pretrained",
    "CheckpointReader",
    "CheckpointError",
    "NetworkError",
    "quantize_fp8",
    "dequantize_fp8",
    "K2_QUANTIZATION_CONFIG",
    "quantize_packed",
    "dequantize_packed",
    "K2_THINKING_QUANTIZATION_CONFIG",
]
