"""k2mini: the Kimi K2 architecture (MLA, sigmoid-routed fine-grained MoE, MuonClip) in compact PyTorch.

The names below are the public API. Subpackages load on first use: `k2mini.optim` (Muon, MuonClip,
qk_clip_), `k2mini.analysis` (router summaries, streamed activations), `k2mini.lab` (what the
notebooks run and draw: experiments, studies, plots, pretrained minis; the library never imports it).
`k2mini.pretrained_mini` is forwarded to `k2mini.lab` on first use.
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
    "pretrained_mini",
    "train",
    "TrainConfig",
    "NonFiniteLossError",
]

_SUBMODULES = {
    "optim", "analysis", "balance", "checkpoint", "moe", "attention", "rope", "norm", "lab",
}


def __getattr__(name: str):
    if name == "pretrained_mini":  # lives in the lab; forwarded so `k2mini.pretrained_mini(...)` keeps working
        return importlib.import_module(".lab", __name__).pretrained_mini
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'k2mini' has no attribute {name!r}")
