"""A dataset: one token stream, split into train/validation by blocks, batches keyed by (seed, split, step).

``make_dataset`` tokenizes a corpus (or several, added) into one stream and cuts it into blocks, a seeded
subset of which is validation. ``TokenDataset.batch_for_step`` is the one way to draw a training batch:
it depends only on ``(seed, split, domain, step)``, so a resumed run sees the same batches;
``iter_val_batches`` gives the same validation batches every time.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np
import torch

from .corpus import Corpus
from .byte_tokenizer import ByteTokenizer

__all__ = ["TokenDataset", "make_dataset", "SPLITS"]

SPLITS = ("train", "val")


def _derive_seed(*parts) -> int:
    """A 63-bit seed from the parts, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _pick_validation_blocks(block_domain: torch.Tensor, val_fraction: float, seed: int) -> torch.Tensor:
    """Bool mask over blocks. Each domain gives ``round(val_fraction * its blocks)`` blocks (at least
    one, and never all of them), picked by a generator seeded with ``seed``."""
    is_val = torch.zeros(len(block_domain), dtype=torch.bool)
    if val_fraction == 0:
        return is_val
    g = torch.Generator().manual_seed(seed)
    for d in torch.unique(block_domain).tolist():
        blocks = torch.nonzero(block_domain == d).flatten()
        if len(blocks) < 2:
            continue
        n_val = min(max(1, round(val_fraction * len(blocks))), len(blocks) - 1)
        is_val[blocks[torch.randperm(len(blocks), generator=g)[:n_val]]] = True
    return is_val


class TokenDataset:
    """A token stream cut into ``block_size`` blocks, a seeded subset of which is validation.

    Windows never cross a train/val boundary or a domain boundary, so validation text is never seen in
    training. ``batch_for_step`` depends only on ``(seed, split, domain, step)``.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        domain_spans: Sequence[tuple[int, int, str]],
        *,
        val_fraction: float = 0.05,
        seed: int = 0,
        block_size: int = 4096,
        tokenizer: ByteTokenizer | None = None,
        name: str = "",
    ):
        if tokens.dim() != 1 or len(tokens) < 2:
            raise ValueError(f"TokenDataset: tokens must be 1-D with >= 2 entries, got {tuple(tokens.shape)}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"TokenDataset: val_fraction must be in [0, 1), got {val_fraction}")
        if block_size < 2:
            raise ValueError(f"TokenDataset: block_size must be >= 2, got {block_size}")
        self.tokens = tokens.to(torch.int16).contiguous()  # vocab 260 fits; batches come out as long
        self.tokenizer = tokenizer or ByteTokenizer()
        self.name, self.seed, self.block_size, self.val_fraction = name, seed, block_size, val_fraction
        n = len(self.tokens)
        bounds = [0] + [e for _, e, _ in domain_spans]
        if [s for s, _, _ in domain_spans] != bounds[:-1] or bounds[-1] != n or not domain_spans:
            raise ValueError(
                f"TokenDataset: domain_spans must tile [0, {n}) as consecutive (start, end, domain) "
                f"ranges, got {list(domain_spans)[:4]}..."
            )
        self.domains = list(dict.fromkeys(d for _, _, d in domain_spans))
        self.domain_spans = list(domain_spans)

        span_starts = torch.tensor([s for s, _, _ in domain_spans])
        span_domain = torch.tensor([self.domains.index(d) for _, _, d in domain_spans])

        def domain_at(pos: torch.Tensor) -> torch.Tensor:
            return span_domain[torch.searchsorted(span_starts, pos, right=True) - 1]

        block_starts = torch.arange(0, n, block_size)
        self.block_is_val = _pick_validation_blocks(domain_at(block_starts), val_fraction, seed)

        # maximal runs of equal (split, domain): cut at every block and domain boundary, then merge
        cuts = torch.unique(torch.cat([block_starts, span_starts, torch.tensor([n])]))
        starts, ends = cuts[:-1], cuts[1:]
        labels = list(zip(self.block_is_val[starts // block_size].tolist(), domain_at(starts).tolist()))
        self._segments: dict[tuple[str, str], list[tuple[int, int]]] = {}
        run_start = 0
        for i in range(len(labels)):
            if i + 1 == len(labels) or labels[i + 1] != labels[i]:
                is_val, d = labels[i]
                key = (SPLITS[is_val], self.domains[d])
                self._segments.setdefault(key, []).append((int(starts[run_start]), int(ends[i])))
                run_start = i + 1

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def __len__(self) -> int:
        return len(self.tokens)

    def segments(self, split: str, domain: str | None = None) -> list[tuple[int, int]]:
        """Sorted ``(start, end)`` token ranges of one split (optionally one domain)."""
        self._check(split, domain)
        doms = self.domains if domain is None else [domain]
        return sorted(seg for d in doms for seg in self._segments.get((split, d), []))

    def num_tokens(self, split: str, domain: str | None = None) -> int:
        return sum(e - s for s, e in self.segments(split, domain))

    def _check(self, split: str, domain: str | None) -> None:
        if split not in SPLITS:
            raise ValueError(f"TokenDataset: split must be one of {SPLITS}, got {split!r}")
        if domain is not None and domain not in self.domains:
            raise ValueError(f"TokenDataset: unknown domain {domain!r}; this dataset has {self.domains}")

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.name!r}, tokens={len(self):,}, train={self.num_tokens('train'):,}, "
            f"val={self.num_tokens('val'):,}, domains={self.domains}, block_size={self.block_size}, "
            f"seed={self.seed})"
        )

    # -- sampling ------------------------------------------------------------------------------

    def _windows(self, split: str, seq_len: int, domain: str | None):
        """Segment starts and the cumulative count of valid window starts (a window is seq_len + 1
        tokens: inputs plus the shifted targets)."""
        if seq_len < 1:
            raise ValueError(f"TokenDataset: seq_len must be >= 1, got {seq_len}")
        segs = self.segments(split, domain)
        counts = torch.tensor([max(0, e - s - seq_len) for s, e in segs], dtype=torch.long)
        if int(counts.sum()) == 0:
            longest = max((e - s for s, e in segs), default=0)
            raise ValueError(
                f"TokenDataset: no {split!r} window of seq_len + 1 = {seq_len + 1} tokens"
                + (f" in domain {domain!r}" if domain else "")
                + f"; the longest {split} segment has {longest} tokens (lower seq_len, or raise "
                "block_size / val_fraction in make_dataset)"
            )
        return torch.tensor([s for s, _ in segs], dtype=torch.long), counts.cumsum(0)

    def sample_starts(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
        domain: str | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Uniformly drawn start positions of ``batch_size`` windows in ``split``."""
        seg_starts, cum = self._windows(split, seq_len, domain)
        u = torch.randint(int(cum[-1]), (batch_size,), generator=generator)
        seg = torch.searchsorted(cum, u, right=True)
        before = torch.cat([torch.zeros(1, dtype=torch.long), cum])[seg]
        return seg_starts[seg] + (u - before)

    def _gather(self, starts: torch.Tensor, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T + 1)
        window = self.tokens[idx].long()
        x, y = window[:, :-1], window[:, 1:]
        return x.to(device), y.to(device)

    def step_generator(self, split: str, step: int, seed: int | None = None, domain: str | None = None):
        """The generator behind ``batch_for_step``: a function of (seed, split, domain, step) only."""
        seed = self.seed if seed is None else seed
        return torch.Generator().manual_seed(_derive_seed("k2mini.data", seed, split, domain, int(step)))

    def batch_for_step(
        self, split: str, step: int, batch_size: int, seq_len: int, seed: int | None = None, *,
        domain: str | None = None, device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(x, y)`` of shape (batch_size, seq_len), ``y[:, t] == x[:, t + 1]`` along the stream: the batch
        of step ``step`` of ``split`` (optionally of one ``domain``). Identical in every run with the same
        seed (defaults to the dataset's), so a resumed run continues with exactly the batches it would
        have seen."""
        if batch_size < 1:
            raise ValueError(f"TokenDataset.batch_for_step: batch_size must be >= 1, got {batch_size}")
        generator = self.step_generator(split, step, seed, domain)
        starts = self.sample_starts(split, batch_size, seq_len, generator, domain)
        return self._gather(starts, seq_len, device)

    def val_starts(
        self, seq_len: int, max_windows: int | None = None, domain: str | None = None
    ) -> torch.Tensor:
        """Starts of non-overlapping validation windows; with ``max_windows``, an evenly spaced subset
        of them (so a small evaluation still spans the whole validation set)."""
        self._windows("val", seq_len, domain)  # raises a clear error when there is no window
        starts = torch.cat([
            torch.arange(s, e - seq_len, seq_len) for s, e in self.segments("val", domain) if e - s > seq_len
        ])  # fmt: skip
        if max_windows is not None and len(starts) > max_windows:
            starts = starts[torch.arange(max_windows) * len(starts) // max_windows]
        return starts

    def iter_val_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None, *,
        domain: str | None = None, device: str | torch.device | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """The same validation batches every time: non-overlapping windows in stream order (evenly
        thinned to ``max_batches * batch_size`` windows); the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"TokenDataset.iter_val_batches: batch_size must be >= 1, got {batch_size}")
        limit = None if max_batches is None else max_batches * batch_size
        starts = self.val_starts(seq_len, limit, domain)
        for i in range(0, len(starts), batch_size):
            yield self._gather(starts[i : i + batch_size], seq_len, device)


def make_dataset(
    corpus: Corpus | Sequence[Corpus],
    tokenizer: ByteTokenizer | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    *,
    block_size: int = 4096,
) -> TokenDataset:
    """Tokenize ``corpus`` (or several, added) into one stream, documents separated by ``doc_id``, and
    split it into train/validation by contiguous blocks of ``block_size`` tokens."""
    if not isinstance(corpus, Corpus):
        parts = list(corpus)
        if not parts or not all(isinstance(c, Corpus) for c in parts):
            raise TypeError("make_dataset: expected a Corpus or a non-empty sequence of Corpus objects")
        corpus = parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])
    if not corpus.documents:
        raise ValueError(f"make_dataset: corpus {corpus.name!r} has no documents")
    tokenizer = tokenizer or ByteTokenizer()
    sep = np.array([tokenizer.doc_id], dtype=np.int16)
    pieces, spans, pos = [], [], 0
    for i, (doc, domain) in enumerate(zip(corpus.documents, corpus.domains)):
        ids = tokenizer.encode_tensor(doc, dtype=torch.int16).numpy()
        if i:
            pieces.append(sep)  # the separator belongs to the document it opens
        start, pos = pos, pos + len(ids) + (1 if i else 0)
        pieces.append(ids)
        if spans and spans[-1][2] == domain:
            spans[-1] = (spans[-1][0], pos, domain)
        else:
            spans.append((start, pos, domain))
    tokens = torch.from_numpy(np.concatenate(pieces))
    return TokenDataset(
        tokens, spans, val_fraction=val_fraction, seed=seed, block_size=block_size,
        tokenizer=tokenizer, name=corpus.name,
    )  # fmt: skip
