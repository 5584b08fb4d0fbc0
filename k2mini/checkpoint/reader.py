"""Reading tensors out of a HF-format safetensors checkpoint (a directory with config.json and
model.safetensors or a sharded index).

Minimal local reader; fp8 block scales, remote sources and header validation extend it.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint is malformed; the message names the file and tensor at fault."""


class CheckpointReader:
    def __init__(self, source: str | os.PathLike):
        self.source = os.fspath(source)
        if not os.path.isdir(self.source):
            raise FileNotFoundError(f"{self.source}: not a checkpoint directory")
        cfg_path = os.path.join(self.source, "config.json")
        if not os.path.exists(cfg_path):
            raise CheckpointError(f"{cfg_path}: missing")
        with open(cfg_path, encoding="utf-8") as f:
            self.config = json.load(f)
        index = os.path.join(self.source, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                self.weight_map = dict(json.load(f)["weight_map"])
        else:
            single = os.path.join(self.source, "model.safetensors")
            if not os.path.exists(single):
                raise CheckpointError(f"{self.source}: neither model.safetensors nor model.safetensors.index.json")
            with safe_open(single, "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        self._handles = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _open(self, shard: str):
        if shard not in self._handles:
            path = os.path.join(self.source, shard)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: shard named by the index is missing")
            self._handles[shard] = safe_open(path, "pt")
        return self._handles[shard]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._shard(name)).get_slice(name).get_shape())

    def _shard(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing from the checkpoint") from None

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._open(self._shard(name)).get_tensor(name).to(dtype)

    def close(self):
        self._handles.clear()
