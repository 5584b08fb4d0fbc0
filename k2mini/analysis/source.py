"""Opening a checkpoint for analysis: a reader, its validated config, the layers asked for, its size."""

from __future__ import annotations

from ..checkpoint import CheckpointError, CheckpointReader
from ..checks import check_int
from ..config import K2Config


def open_reader(source, fs=None) -> tuple[CheckpointReader, bool]:
    """(reader, whether the caller owns it and must close it). `source` may be an open reader."""
    if isinstance(source, CheckpointReader):
        return source, False
    return CheckpointReader(source, fs=fs), True


def checkpoint_config(reader: CheckpointReader) -> K2Config:
    """The checkpoint's K2Config; a config that is not of the DeepseekV3 family is a CheckpointError."""
    try:
        return K2Config.from_hf(reader.config)
    except ValueError as e:
        raise CheckpointError(f"{reader.files.url('config.json')}: {e}") from None


def resolve_layers(config: K2Config, layers=None, moe_only: bool = False) -> list[int]:
    """Sorted layer indices from None (all), an int, a range/slice or an iterable of ints.

    Out-of-range indices are a ValueError naming the model's layer count; with moe_only, dense layers
    are dropped and a selection with no MoE layer left is a ValueError.
    """
    n = config.num_hidden_layers
    if layers is None:
        chosen = list(range(n))
    elif isinstance(layers, slice):
        chosen = list(range(n)[layers])
        if not chosen:
            raise ValueError(f"layers {layers} selects none of the checkpoint's {n} layers (0..{n - 1})")
    else:
        items = [layers] if isinstance(layers, int) else list(layers)
        if not items:
            raise ValueError("layers: an empty selection (pass None for all layers)")
        for i in items:
            check_int(i, "each layer index", where="layers")
        bad = [i for i in items if not 0 <= i < n]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: the checkpoint has {n} layers (0..{n - 1})")
        chosen = sorted(set(items))
    if moe_only:
        dense = config.first_k_dense_replace
        chosen = [i for i in chosen if config.is_moe_layer(i)]
        if not chosen:
            raise ValueError(
                f"layers {layers!r}: no MoE layer selected (layers 0..{min(dense, n) - 1} are dense, "
                f"first_k_dense_replace={dense}; MoE layers are {dense}..{n - 1})"
            )
    return chosen


def parse_layers(text: str | None):
    """CLI spelling of a layer selection: "5", "3:10" (a range, end excluded) or "1,4,7"."""
    if text is None or text == "":
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return slice(int(a) if a else None, int(b) if b else None)
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r}: use N, START:STOP or N,M,...") from None


def checkpoint_bytes(reader: CheckpointReader) -> int:
    """Size of all the checkpoint's shard files (from their sizes: no tensor data is read)."""
    total = 0
    for shard in reader.shards():
        f = reader.files.open(shard)
        try:
            total += f.size
        finally:
            f.close()
    return total
