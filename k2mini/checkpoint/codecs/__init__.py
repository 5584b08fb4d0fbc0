"""One codec per storage format of a checkpoint's tensors, and the registry CheckpointReader asks.

A format is a file here with a `Codec` subclass (base.py says what it answers) and one `register` call
below; code outside the package (a test, a user's own format) registers in the same way. The reader
asks the registered codecs in order, then `Plain`, which takes every tensor left.
"""

from __future__ import annotations

from .base import Codec
from .fp8_blocks import Fp8Blocks
from .int4_packed import Int4Packed
from .plain import Plain

__all__ = ["Codec", "Plain", "Fp8Blocks", "Int4Packed", "register", "unregister", "registered"]

_REGISTRY: list[type[Codec]] = []


def register(codec: type[Codec]) -> type[Codec]:
    """Add a format (asked after those already registered); returns it, so it can decorate a class."""
    if not (isinstance(codec, type) and issubclass(codec, Codec)) or codec is Plain:
        raise TypeError(f"register() takes a Codec subclass other than Plain, got {codec!r}")
    if any(c.name == codec.name for c in _REGISTRY):
        raise ValueError(f"a codec named {codec.name!r} is already registered")
    _REGISTRY.append(codec)
    return codec


def unregister(codec: type[Codec]) -> None:
    """Remove a format registered before (readers opened from now on no longer know it)."""
    _REGISTRY.remove(codec)


def registered() -> list[type[Codec]]:
    """The codecs a reader opened now asks, in order: the registered ones, then Plain."""
    return [*_REGISTRY, Plain]


register(Int4Packed)
register(Fp8Blocks)
