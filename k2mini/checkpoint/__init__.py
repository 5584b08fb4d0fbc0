"""Checkpoints in the Hugging Face layout (the only place that knows HF tensor names)."""

from .load import load_pretrained
from .reader import CheckpointError, CheckpointReader

__all__ = ["load_pretrained", "CheckpointError", "CheckpointReader"]
