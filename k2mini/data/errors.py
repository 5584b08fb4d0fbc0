"""What can go wrong with a corpus; every message says what to do about it."""

__all__ = ["CorpusError", "CorpusNotFoundError", "ChecksumError", "FETCH_HINT"]

FETCH_HINT = "run `make corpus` or `python -m k2mini.data fetch`"


class CorpusError(RuntimeError):
    """A corpus could not be fetched or loaded; the message says what to do about it."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """The corpus is not on disk (or not completely)."""


class ChecksumError(CorpusError):
    """A downloaded archive is not the one whose SHA-256 is recorded under data/."""
