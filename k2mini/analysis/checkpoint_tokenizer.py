"""A checkpoint's own tokenizer, from the files it ships, offline (local directory, hf:// or http(s)).

    Kimi-K2                 tiktoken.model (one "base64-token rank" line per BPE token) +
                            tokenizer_config.json (the special tokens after the BPE ranks)
    DeepSeek-V3, Moonlight  tokenizer.json (Hugging Face `tokenizers`)
    k2mini minis            no files: byte-level, vocabulary 260 -> k2mini.ByteTokenizer

`load_tokenizer(source).encode(text)` gives the ids the model was trained on (no BOS/EOS added).
"""

from __future__ import annotations

import base64
import json

from ..checkpoint.sources import open_source
from ..data import ByteTokenizer

TIKTOKEN_FILE = "tiktoken.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# Kimi-K2's pre-tokenizer split (its tokenization_kimi.py): runs of Han characters; words with an
# optional leading non-letter, upper- and lower-case letter runs and English contractions; numbers of
# up to 3 digits; punctuation runs; newlines; other whitespace.
KIMI_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
KIMI_RESERVED_SPECIALS = 256 + 2  # ids right after the BPE ranks; named by tokenizer_config.json
MAX_RUN = 25_000  # tiktoken's matcher struggles with longer runs of (non-)whitespace: encode in slices


class TokenizerError(ValueError):
    """A checkpoint's tokenizer files are missing or malformed (the message names the file)."""


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text for one checkpoint; `kind` says which format."""

    def __init__(self, kind: str, encode, decode, vocab_size: int, source: str):
        self.kind, self._encode, self._decode = kind, encode, decode
        self.vocab_size, self.source = vocab_size, source

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self._encode(text))

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.reshape(-1).tolist()
        return self._decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, source={self.source!r})"


def parse_tiktoken_ranks(data: bytes, where: str) -> dict[bytes, int]:
    """tiktoken.model: `base64(token bytes) rank` per line -> {token bytes: rank}."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (IndexError, ValueError) as e:
            raise TokenizerError(f"{where}: line {n} is not 'base64-token rank' ({e})") from None
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{where}: no tokens")
    return ranks


def split_runs(text: str, limit: int = MAX_RUN):
    """Slices of `text` with no run of whitespace or of non-whitespace longer than `limit` characters."""
    start, run, space = 0, 0, text[:1].isspace()
    for i, ch in enumerate(text):
        s = ch.isspace()
        if s != space:
            run, space = 1, s
        else:
            run += 1
            if run > limit:
                yield text[start:i]
                start, run = i, 1
    yield text[start:]


def _tiktoken(files, data: bytes, where: str) -> Tokenizer:
    try:
        import tiktoken
    except ImportError:
        raise ImportError(f"{where}: reading a tiktoken tokenizer needs the tiktoken package (pip install tiktoken)") from None
    ranks = parse_tiktoken_ranks(data, where)
    n_base = len(ranks)
    names = {}
    try:
        cfg = json.loads(files.read_file(TOKENIZER_CONFIG))
        for i, tok in (cfg.get("added_tokens_decoder") or {}).items():
            names[int(i)] = tok["content"] if isinstance(tok, dict) else str(tok)
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{files.url(TOKENIZER_CONFIG)}: malformed added_tokens_decoder ({e})") from None
    specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(n_base, n_base + KIMI_RESERVED_SPECIALS)}
    try:
        enc = tiktoken.Encoding(name=TIKTOKEN_FILE, pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    except ValueError as e:
        raise TokenizerError(f"{where}: {e}") from None

    def encode(text):
        ids = []
        for piece in split_runs(text):
            ids.extend(enc.encode(piece, allowed_special="all"))  # as Kimi's tokenizer encodes by default
        return ids

    return Tokenizer("tiktoken", encode, enc.decode, enc.n_vocab, where)


def _hf_tokenizers(files, data: bytes, where: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the Rust library raises its own exception type
        raise TokenizerError(f"{where}: not a valid tokenizers file ({e})") from None
    return Tokenizer(
        "tokenizers",
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        tok.get_vocab_size(with_added_tokens=True),
        where,
    )


def _byte_level() -> Tokenizer:
    b = ByteTokenizer()
    return Tokenizer("bytes", b.encode, b.decode, b.vocab_size, "k2mini.ByteTokenizer")


def load_tokenizer(source, fs=None) -> Tokenizer:
    """The tokenizer a checkpoint ships: tiktoken.model (Kimi-K2), tokenizer.json (DeepSeek-V3,
    Moonlight), or, for a byte-level k2mini mini (vocabulary 260, no files), the ByteTokenizer."""
    files = open_source(getattr(source, "files", source), fs)
    for name, make in ((TIKTOKEN_FILE, _tiktoken), (TOKENIZER_JSON, _hf_tokenizers)):
        try:
            data = files.read_file(name)
        except FileNotFoundError:
            continue
        return make(files, data, files.url(name))
    try:
        config = json.loads(files.read_file("config.json"))
    except FileNotFoundError:
        raise TokenizerError(f"{files.address}: no tokenizer files ({TIKTOKEN_FILE}, {TOKENIZER_JSON}) and no config.json") from None
    vocab = config.get("vocab_size")
    if vocab == ByteTokenizer.vocab_size:
        return _byte_level()
    raise TokenizerError(
        f"{files.address}: no tokenizer files ({TIKTOKEN_FILE} or {TOKENIZER_JSON}), and the vocabulary "
        f"({vocab}) is not the byte-level one of k2mini's minis ({ByteTokenizer.vocab_size})"
    )


def encode_batch(tokenizer, texts: dict[str, str], seq_len: int, rows_per_text: int | None = None):
    """Texts (label -> text) as one (B, T) batch of consecutive token windows, and one label per row.

    Each text is encoded and cut into windows of T = min(seq_len, shortest text's token count) tokens
    (a shorter tail is dropped), at most `rows_per_text` windows per text. A text that tokenizes to
    nothing is a ValueError naming its label.
    """
    import torch

    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not texts:
        raise ValueError("encode_batch: no texts given")
    encoded = {}
    for label, text in texts.items():
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"{label}: the text tokenizes to no tokens (is it empty or only ignored bytes?)")
        encoded[label] = ids
    T = min(seq_len, *(len(v) for v in encoded.values()))
    rows, labels = [], []
    for label, ids in encoded.items():
        n = len(ids) // T
        if rows_per_text is not None:
            n = min(n, rows_per_text)
        rows.extend(ids[r * T : (r + 1) * T] for r in range(n))
        labels.extend([label] * n)
    return torch.tensor(rows, dtype=torch.int64), labels
