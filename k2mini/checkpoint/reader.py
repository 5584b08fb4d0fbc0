"""CheckpointReader: single tensors (or row slices of them) out of a HF-format safetensors checkpoint,
on demand, from a local directory, `hf://owner/repo` or an http(s) base URL.

It reads config.json and model.safetensors.index.json (or a single model.safetensors) when opened, and
a shard's header only when a tensor of that shard is first asked for. A tensor read fetches that
tensor's bytes and nothing else. Every header is validated against the file size before any of its
bytes are used.

The reader is an index (which stored tensors make up a name, where their bytes are: this file) and
I/O (shard_files.py); what the bytes mean is a codec's, one per storage format (codecs/): plain,
fp8 with block scales (`F8_E4M3` + `<name>_scale_inv`) and compressed-tensors' pack-quantized INT4
(`<m>.weight_packed`, `_scale`, `_shape`, served as `<m>.weight`). Quantized weights come back
dequantized to the requested dtype.

Multimodal wrappers (Kimi-K2.5 / K2.6) are read as their text model: config.json's `text_config` is the
config, and the tensors under `language_model.` are the checkpoint, named without that prefix.
"""

from __future__ import annotations

import posixpath

import torch
from tqdm.auto import tqdm

from . import codecs
from .codecs.plain import bytes_of
from .names import expert_hf_name
from .safetensors_format import FP8_DTYPES, CheckpointError, TensorInfo, read_header
from .shard_files import ShardFiles, naming
from .sources import open_source

__all__ = ["CheckpointReader", "CheckpointError"]

CONFIG = "config.json"
READ_AHEAD_BYTES = 32 * 2**20  # how far ahead streaming reads ask the kernel for bytes (local files)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CORRECTION_BIAS = "e_score_correction_bias"
TEXT_PREFIX = "language_model."  # a multimodal wrapper's text model (Kimi-K2.5 / K2.6)


class CheckpointReader:
    """Lazy, validating reader of one checkpoint.

    source: a directory, `hf://owner/repo[@revision][/subdir]`, or an http(s) URL of the directory.
    fs: the fsspec filesystem for http(s) URLs (default: fsspec's HTTP filesystem).
    timeout: for that default filesystem, seconds an HTTP connect or read may go without progress
    (default sources.DEFAULT_TIMEOUT). A failed read is a NetworkError naming the URL and the tensor.
    """

    def __init__(self, source, fs=None, timeout: float | None = None):
        self.files = open_source(source, fs, timeout)
        self.source = self.files.address
        self.io = ShardFiles(self.files)
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        try:
            where = self.files.url(CONFIG)
            self.config, self.prefix = _text_config(self.io.read_json(CONFIG), where)
            self.codecs = [codec(self.config, where) for codec in codecs.registered()]
            self.index = self.io.shard_of = self._read_weight_map()  # stored name -> shard, as the files say
            self.weight_map = {  # the model's names (a wrapper's prefix removed) -> shard
                k[len(self.prefix) :]: v for k, v in self.index.items() if k.startswith(self.prefix)
            }
            if self.prefix and not self.weight_map:
                raise CheckpointError(f"{self.source}: config.json has a text_config but no tensor is named {self.prefix}*")
            self._served = self._serve(self.files.url(INDEX))  # name -> (codec, the stored tensors it is made of)
            self._claimed: dict[str, codecs.Codec] = {}
            self._keys: list[str] | None = None
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- what is there
    def keys(self) -> list[str]:
        """Tensor names: a tensor a format makes of several stored ones appears once, in place of its
        first part (an fp8 weight without its `_scale_inv`; `<m>.weight` for a pack-quantized weight)."""
        if self._keys is None:
            first = {parts[0]: name for name, (_, parts) in self._served.items()}
            parts = {p for _, ps in self._served.values() for p in ps}
            self._keys = [first.get(k, k) for k in self.weight_map if k in first or k not in parts]
        return list(self._keys)

    def stored_keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self._served

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shard_of(self, name: str) -> str:
        if name in self._served:
            name = self._served[name][1][0]
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing from the checkpoint") from None

    def header(self, shard: str, for_tensor: str | None = None) -> dict[str, TensorInfo]:
        """name -> TensorInfo of one shard (fetched and validated on first use)."""
        if shard not in self._headers:
            with naming(for_tensor):
                self._headers[shard] = read_header(self.io.file(shard, for_tensor), self.files.url(shard))
        return self._headers[shard]

    def info(self, name: str) -> TensorInfo:
        """Where a stored tensor lives (for a name a format serves: its first part, e.g. a pack-quantized
        `<m>.weight`'s `weight_packed` words)."""
        if name in self._served:
            name = self._served[name][1][0]
        shard = self.shard_of(name)
        infos = self.header(shard, name)
        stored = self.prefix + name
        if stored not in infos:
            raise CheckpointError(f"{self.files.url(shard)}: tensor {stored!r}, named by the index, is not in this shard")
        return infos[stored]

    def codec(self, name: str) -> codecs.Codec:
        """The codec of `name`'s storage format (codecs/): by the index, else by its stored dtype."""
        if name in self._served:
            return self._served[name][0]
        if name not in self._claimed:
            info = self.info(name)
            self._claimed[name] = next(c for c in self.codecs if c.claims(info))  # Plain claims every tensor
        return self._claimed[name]

    def format(self, name: str) -> str:
        """How `name` is stored: "plain", "fp8 blocks", "pack-quantized", or a registered codec's name."""
        return self.codec(name).name

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape as get() returns it (a packed weight's (out, in), from its weight_shape)."""
        return self.codec(name).shape(self, name)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (float8_e4m3fn for an fp8 weight, int32 for a packed one)."""
        return self.info(name).torch_dtype

    def is_fp8(self, name: str) -> bool:
        return self.format(name) == codecs.Fp8Blocks.name and self.info(name).dtype in FP8_DTYPES

    def is_packed(self, name: str) -> bool:
        """Whether `name` is stored pack-quantized (compressed-tensors: weight_packed / _scale / _shape)."""
        return name in self._served and self._served[name][0].name == codecs.Int4Packed.name

    @property
    def block(self) -> tuple[int, int]:
        """The fp8 block size (quantization_config.weight_block_size)."""
        return next(c for c in self.codecs if isinstance(c, codecs.Fp8Blocks)).block

    @property
    def pack_scheme(self):
        """The INT4 PackScheme of config.json's quantization_config (None: not pack-quantized)."""
        return next(c for c in self.codecs if isinstance(c, codecs.Int4Packed)).scheme

    def check(self, name: str, shape=None, floating: bool = False) -> TensorInfo:
        """Validate one tensor without reading its data (its format's companions present and of the
        right shapes), optionally its shape and a floating-point dtype. Raises CheckpointError naming
        the file and tensor; returns the TensorInfo of its (first) stored tensor."""
        return self.codec(name).check(self, name, shape, floating)

    def stored_parts(self, name: str) -> tuple[str, ...]:
        """The stored tensors a read of `name` needs: itself, an fp8 weight's scales, a packed weight's three parts."""
        return self.codec(name).bytes(self, name)

    _with_scales = stored_parts  # the earlier name (tests use it)

    # ----------------------------------------------------------------- reading
    def get(self, name: str, dtype: torch.dtype = torch.float32, rows=None, out: torch.Tensor | None = None):
        """One tensor as `dtype` (quantized weights dequantized); `rows` (a slice) reads only those rows.

        out: a destination of the right shape; its dtype wins over `dtype`, and the bytes go straight
        into it (no intermediate copy of the whole tensor). A router's correction bias must be finite:
        a nan would silently send every token to the same experts.
        """
        out = self._get(name, dtype, rows, out)
        if name.endswith(CORRECTION_BIAS) and not bool(torch.isfinite(out).all()):
            bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
            raise CheckpointError(f"{self.info(name).file}: tensor {name!r} holds inf or nan (at experts {bad[:8]})")
        return out

    def _get(self, name: str, dtype, rows, out):
        codec = self.codec(name)
        info = codec.check(self, name)
        shape = codec.shape(self, name)
        r0, r1 = _row_range(info.name, shape, rows)
        want = (r1 - r0, *shape[1:]) if shape else ()
        if out is not None:
            if not _writable_in_place(out, want, info.file, name):
                return out.copy_(self._get(name, out.dtype, rows, None))
            dtype = out.dtype
        return codec.read(self, name, (r0, r1), dtype, out)

    def read_raw(self, name: str, rows=None) -> torch.Tensor:
        """The stored tensor (float8 bytes as float8_e4m3fn), rows optionally sliced."""
        if name in self._served and name not in self.weight_map:
            codec, _ = self._served[name]
            raise ValueError(f"{name} is stored {codec.name}: read_raw() its parts {', '.join(self.stored_parts(name))}")
        info = self.check(name)
        r0, r1 = _row_range(info.name, info.shape, rows)
        out = torch.empty((r1 - r0, *info.shape[1:]) if info.shape else (), dtype=info.torch_dtype)  # no zero-filling
        if out.numel():
            self.io.readinto(info, info.start + r0 * info.row_bytes, bytes_of(out))
        return out

    def get_expert(self, layer: int, expert: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """One routed expert: {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}."""
        return {p: self.get(expert_hf_name(layer, expert, p), dtype) for p in ("gate_proj", "up_proj", "down_proj")}

    def will_need_expert(self, layer: int, expert: int) -> None:
        """`will_need` for the three matrices of one routed expert."""
        for p in ("gate_proj", "up_proj", "down_proj"):
            self.will_need(expert_hf_name(layer, expert, p))

    def group_by_shard(self, names) -> dict[str, list[str]]:
        """names grouped by shard (shards in file order), each group in the order of the bytes."""
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(self.shard_of(name), []).append(name)
        return {s: sorted(groups[s], key=lambda n: self.info(n).start) for s in sorted(groups)}

    def iter_tensors(self, names=None, dtype: torch.dtype = torch.float32, progress: bool = False):
        """Yield (name, tensor) shard by shard, with a progress bar over shards. While one tensor is
        converted, the next one's bytes are already on their way into the page cache (local files)."""
        groups = self.group_by_shard(self.keys() if names is None else names)
        for shard, group in tqdm(groups.items(), desc="reading shards", unit="shard", disable=not progress):
            for name in self.read_ahead(group):
                yield name, self.get(name, dtype)

    def read_ahead(self, names, window: int = READ_AHEAD_BYTES):
        """Yield `names` in order; before each, make sure the tensors after it, up to `window` bytes
        (fp8 scales included), have been hinted with `will_need`. Read them in this order."""
        names = list(names)
        sizes = [sum(self.info(n).nbytes for n in self.stored_parts(name)) for name in names]
        ahead, j = 0, 1  # names[i + 1 : j] are hinted, `ahead` bytes in all
        for i, name in enumerate(names):
            while j < len(names) and ahead < window:
                self.will_need(names[j])
                ahead += sizes[j]
                j += 1
            yield name
            if i + 1 < j:
                ahead -= sizes[i + 1]

    def will_need(self, name: str) -> None:
        """Hint that tensor `name` (and its fp8 scales) will be read next: a local file starts loading
        those bytes in the background; no memory of this process is used. A no-op for remote sources."""
        for n in self.stored_parts(name):
            self.io.will_need(self.info(n))

    @property
    def bytes_read(self) -> int:
        """Bytes fetched so far: json files, shard headers and tensor data."""
        return self.io.bytes_read

    def close(self):
        self.io.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"CheckpointReader({self.source!r}, {len(self.weight_map)} tensors in {len(self.shards())} shards)"

    # ----------------------------------------------------------------- opening
    def _read_weight_map(self) -> dict[str, str]:
        index = self.io.read_json(INDEX, missing_ok=True)
        if index is None:
            try:
                self.io.open(SINGLE)
            except FileNotFoundError:
                raise CheckpointError(
                    f"{self.source}: neither {INDEX} nor {SINGLE} (only safetensors checkpoints are read; "
                    "pickled .bin/.pt files never are)"
                ) from None
            return {k: SINGLE for k in self.header(SINGLE)}
        url = self.files.url(INDEX)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{url}: weight_map must map tensor names to shard file names")
        for name, shard in wm.items():
            plain = posixpath.basename(shard) == shard and shard not in ("", ".", "..") and "\\" not in shard
            if not plain or not shard.endswith(".safetensors"):
                raise CheckpointError(f"{url}: tensor {name!r} is mapped to {shard!r}, not a .safetensors file beside it")
        return dict(wm)

    def _serve(self, where: str) -> dict[str, tuple[codecs.Codec, tuple[str, ...]]]:
        """Each codec's index: the names served from several stored tensors (one format per name)."""
        served: dict[str, tuple[codecs.Codec, tuple[str, ...]]] = {}
        for codec in self.codecs:
            for name, parts in codec.index(self.weight_map, where).items():
                if name in served:
                    raise CheckpointError(f"{where}: tensor {name} is stored both {served[name][0].name} and {codec.name}")
                served[name] = (codec, parts)
        return served


def _writable_in_place(out: torch.Tensor, shape: tuple, file, name: str) -> bool:
    """A caller's destination of the wrong shape is an error naming the tensor; True when the result
    can be read straight into it (contiguous, on the CPU), False when it must be made apart and copied."""
    if tuple(out.shape) != tuple(shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(shape)}, the destination {tuple(out.shape)}")
    return out.device.type == "cpu" and out.is_contiguous()


def _row_range(name: str, shape: tuple[int, ...], rows) -> tuple[int, int]:
    """rows (None, a slice, a (start, stop) tuple or a range) of a tensor of `shape` as [r0, r1)."""
    if not shape:
        if rows is not None:
            raise ValueError(f"{name}: a 0-d tensor has no rows to slice")
        return 0, 0
    if rows is None:
        return 0, shape[0]
    if isinstance(rows, tuple):
        rows = slice(*rows)
    if not isinstance(rows, (slice, range)):
        raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
    r = range(shape[0])[rows] if isinstance(rows, slice) else rows
    if r.step != 1 or r.start < 0 or r.stop > shape[0]:
        raise ValueError(f"{name}: rows {rows} is not a contiguous range of its {shape[0]} rows")
    return r.start, max(r.start, r.stop)


def _text_config(config: dict, where: str) -> tuple[dict, str]:
    """(the text model's config, the prefix of its tensor names): a multimodal wrapper's `text_config`
    (with the wrapper's quantization_config where the text config has none) and `language_model.`."""
    text = config.get("text_config")
    if text is None:
        return config, ""
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: text_config must be a JSON object")
    text = dict(text)
    if "quantization_config" not in text and "quantization_config" in config:
        text["quantization_config"] = config["quantization_config"]
    return text, TEXT_PREFIX
