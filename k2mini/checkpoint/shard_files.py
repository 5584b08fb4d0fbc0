"""The reader's I/O: one checkpoint's files opened on first use, a stored tensor's bytes read straight
into a caller's buffer, large tensors in pieces through one reused buffer, read-ahead hints, and a count
of the bytes fetched. What the bytes mean is the codecs' business (codecs/); every error here names the
file and the tensor being read.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

from .safetensors_format import CheckpointError, TensorInfo, decode
from .sources import NetworkError


class ShardFiles:
    """The files of one checkpoint source (sources.open_source), opened when first read.

    `shard_of` maps a stored tensor's name (as the files spell it) to its shard; the reader fills it
    once the index is read.
    """

    def __init__(self, source):
        self.source = source
        self.shard_of: dict[str, str] = {}
        self._open: dict = {}
        self._closed_bytes = 0
        self._scratch = bytearray(0)

    def read_json(self, name: str, missing_ok: bool = False) -> dict | None:
        """A small JSON file beside the shards (config.json, the index), as an object."""
        url = self.source.url(name)
        try:
            raw = self.source.read_file(name)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise CheckpointError(f"{url}: missing") from None
        self._closed_bytes += len(raw)
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{url}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{url}: expected a JSON object")
        return obj

    def file(self, shard: str, for_tensor: str | None = None):
        """The open range file of one shard (FileNotFoundError if there is none: see `open`)."""
        if shard not in self._open:
            try:
                self._open[shard] = self.source.open(shard)
            except FileNotFoundError:
                why = f" (it holds tensor {for_tensor!r})" if for_tensor else ""
                raise CheckpointError(f"{self.source.url(shard)}: missing{why}") from None
        return self._open[shard]

    def open(self, shard: str):
        """Open `shard` now; FileNotFoundError passes through (the caller words it)."""
        self._open[shard] = self.source.open(shard)
        return self._open[shard]

    def readinto(self, info: TensorInfo, offset: int, buffer) -> None:
        """Bytes of stored tensor `info` from absolute `offset` into `buffer`, all of it."""
        try:
            with naming(info.name):
                self.file(self.shard_of[info.name]).readinto(offset, buffer)
        except EOFError as e:
            raise CheckpointError(f"{info.file}: tensor {info.name!r}: the file is shorter than its header says ({e})") from None

    def pieces(self, info: TensorInfo, r0: int, r1: int, align: int = 1):
        """Rows [r0, r1) of a stored tensor as (a, b, rows a..b decoded), in pieces of about the source's
        read_piece_bytes (a multiple of `align` rows when longer), read into one reused buffer: a
        piece is valid until the next is read."""
        step = max(1, self.source.read_piece_bytes // max(info.row_bytes, 1))
        if step > align:
            step -= step % align  # e.g. whole fp8 block rows per piece
        need = min(step, r1 - r0) * info.row_bytes
        if len(self._scratch) < need:
            self._scratch = bytearray(need)
        view = memoryview(self._scratch)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            buf = view[: (b - a) * info.row_bytes]
            self.readinto(info, info.start + a * info.row_bytes, buf)
            if b < r1:  # the next piece loads while this one is converted
                self.file(self.shard_of[info.name]).will_need(info.start + b * info.row_bytes, buf.nbytes)
            yield a, b, decode(buf, info.dtype, (b - a, *info.shape[1:]))

    def will_need(self, info: TensorInfo) -> None:
        """Hint that the bytes of stored tensor `info` will be read next (a no-op for remote files)."""
        self.file(self.shard_of[info.name]).will_need(info.start, info.nbytes)

    @property
    def bytes_read(self) -> int:
        return self._closed_bytes + sum(f.bytes_read for f in self._open.values())

    def close(self):
        for f in self._open.values():
            self._closed_bytes += f.bytes_read
            f.close()
        self._open.clear()
        self._scratch = bytearray(0)


@contextmanager
def naming(tensor: str | None):
    """A NetworkError raised inside also names the tensor being read."""
    try:
        yield
    except NetworkError as e:
        if tensor is None or "reading tensor" in str(e):
            raise
        raise NetworkError(f"{e} (reading tensor {tensor!r})") from e
