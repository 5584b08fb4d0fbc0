"""k2mini: the Kimi K2 architecture (MLA, sigmoid-routed fine-grained MoE, MuonClip) in compact PyTorch.

The names below are the public API. Subpackages load on first use: `k2mini.optim` (Muon, MuonClip,
qk_clip_), `k2mini.analysis` (router summaries, streamed activations), `k2mini.lab` (what the
notebooks run and draw: experiments, studies, plots, pretrained minis, `k2mini.lab.pretrained_mini`).
The arrows point one way: `import k2mini.lab` to use the lab; nothing here imports it, not even lazily.
"""

import importlib

from .config import K2Config
from .model import CausalLMOutput, K2ForCausalLM, KVCache, RouterRecord, Telemetry
from .checkpoint import CheckpointError, CheckpointReader, NetworkError, load_pretrained, save_pretrained
from .data import ByteTokenizer, Corpus, TokenDataset, fetch_corpus, load_corpus, make_dataset
from .training import NonFiniteLossError, TrainConfig, train  # `k2mini.train(...)`; the module is k2mini.training

__all__ = [
    "K2Config",
    "K2ForCausalLM",
    "CausalLMOutput",
    "KVCache",
    "RouterRecord",
    "Telemetry",
    "CheckpointError",
    "CheckpointReader",
    "NetworkError",
    "load_pretrained",
    "save_pretrained",
    "ByteTokenizer",
    "Corpus",
    "TokenDataset",
    "fetch_corpus",
    "load_corpus",
    "make_dataset",
    "train",
    "TrainConfig",
    "NonFiniteLossError",
]

_SUBMODULES = {
    "optim", "analysis", "balance", "checkpoint", "moe", "attention", "rope", "norm",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'k2mini' has no attribute {name!r}")
