"""A byte-level tokenizer: UTF-8 bytes are tokens 0..255, four specials follow."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; four specials follow. ``decode(encode(s)) == s`` for every
    string UTF-8 can encode (i.e. without lone surrogates)."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    doc_id = 259  # separates documents in a token stream
    vocab_size = 260
    special_tokens = {"<bos>": 256, "<eos>": 257, "<pad>": 258, "<doc>": 259}

    def _bytes(self, text: str) -> bytes:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"ByteTokenizer.encode: text is not encodable as UTF-8 ({e})") from None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self._bytes(text))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_tensor(
        self, text: str, bos: bool = False, eos: bool = False, dtype: torch.dtype = torch.long
    ) -> torch.Tensor:
        raw = np.frombuffer(self._bytes(text), dtype=np.uint8)
        ids = np.empty(len(raw) + bos + eos, dtype=np.int16)  # numpy: torch.cat of int16 is slow on CPU
        ids[bos : bos + len(raw)] = raw
        if bos:
            ids[0] = self.bos_id
        if eos:
            ids[-1] = self.eos_id
        return torch.from_numpy(ids).to(dtype)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of the byte tokens; specials are skipped, invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.reshape(-1).tolist()
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids outside [0, {self.vocab_size}): {bad[:5]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def label(self, token_id: int) -> str:
        """A short printable label for one token (for plots and tables)."""
        names = {v: k for k, v in self.special_tokens.items()}
        if token_id in names:
            return names[token_id]
        if 32 < token_id < 127:
            return chr(token_id)
        return repr(chr(token_id))[1:-1] if token_id < 128 else f"\\x{token_id:02x}"

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"
