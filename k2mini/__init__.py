"""k2mini: the Kimi K2 architecture (MLA, sigmoid-routed fine-grained MoE, MuonClip) in compact PyTorch."""

from .config import K2Config
from .model import CausalLMOutput, K2ForCausalLM, KVCache, RouterRecord, Telemetry
from .checkpoint import CheckpointError, load_pretrained
from .pretrained import pretrained_mini
from .data import ByteTokenizer, Corpus, TokenDataset, fetch_corpus, load_corpus, make_dataset

__all__ = [
    "K2Config",
    "K2ForCausalLM",
    "CausalLMOutput",
    "KVCache",
    "RouterRecord",
    "Telemetry",
    "CheckpointError",
    "load_pretrained",
    "ByteTokenizer",
    "Corpus",
    "TokenDataset",
    "fetch_corpus",
    "load_corpus",
    "make_dataset",
    "pretrained_mini",
]
