"""CheckpointReader: single tensors (or row slices of them) out of a HF-format safetensors checkpoint,
on demand, from a local directory, `hf://owner/repo` or an http(s) base URL.

It reads config.json and model.safetensors.index.json (or a single model.safetensors) when opened, and
a shard's header only when a tensor of that shard is first asked for. A tensor read fetches that
tensor's bytes and nothing else; quantized weights come back dequantized to the requested dtype: fp8
(`F8_E4M3` + `<name>_scale_inv`) and compressed-tensors' pack-quantized INT4 (`<m>.weight_packed`,
`_scale`, `_shape`, served as `<m>.weight`; see int4.py). Every header is validated against the file
size before any of its bytes are used.

Multimodal wrappers (Kimi-K2.5 / K2.6) are read as their text model: config.json's `text_config` is the
config, and the tensors under `language_model.` are the checkpoint, named without that prefix.
"""

from __future__ import annotations

import json
import posixpath
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from . import int4
from .fp8 import BLOCK, dequantize_fp8, scale_shape
from .names import SCALE_SUFFIX, expert_hf_name, is_scale, scale_name
from .safetensors_format import FLOAT_DTYPES, FP8_DTYPES, CheckpointError, TensorInfo, decode, read_header
from .sources import NetworkError, open_source

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
        self._closed_bytes = 0
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._open: dict = {}
        self._scratch = bytearray(0)
        try:
            self.config, self.prefix = _text_config(self._read_json(CONFIG), self.files.url(CONFIG))
            self.block = _block_size(self.config, self.files.url(CONFIG))
            self.pack_scheme = _pack_scheme(self.config, self.files.url(CONFIG))
            self.index = self._read_weight_map()  # stored name -> shard, as the files say
            self.weight_map = {  # the model's names (a wrapper's prefix removed) -> shard
                k[len(self.prefix) :]: v for k, v in self.index.items() if k.startswith(self.prefix)
            }
            if self.prefix and not self.weight_map:
                raise CheckpointError(f"{self.source}: config.json has a text_config but no tensor is named {self.prefix}*")
            self.packed = _packed_weights(self.weight_map, self.files.url(INDEX))  # "<m>.weight" -> "<m>", packed
            self._packed_shapes: dict[str, tuple[int, int]] = {}
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- what is there
    def keys(self) -> list[str]:
        """Tensor names, without the `_scale_inv` companions of fp8 weights (they are part of them); a
        pack-quantized weight appears once, as `<m>.weight`, in place of its three parts."""
        parts = {f"{m}.{p}" for m in self.packed.values() for p in (*int4.PARTS, *int4.UNSUPPORTED_PARTS)}
        out = []
        for k in self.weight_map:
            if k.endswith(".weight_packed") and k in parts:
                out.append(k[: -len("_packed")])
            elif k not in parts and not (is_scale(k) and k[: -len(SCALE_SUFFIX)] in self.weight_map):
                out.append(k)
        return out

    def stored_keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self.packed

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shard_of(self, name: str) -> str:
        if name in self.packed:
            name = self.packed[name] + ".weight_packed"
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing from the checkpoint") from None

    def header(self, shard: str, for_tensor: str | None = None) -> dict[str, TensorInfo]:
        """name -> TensorInfo of one shard (fetched and validated on first use)."""
        if shard not in self._headers:
            with _naming(for_tensor):
                self._headers[shard] = read_header(self._file(shard, for_tensor), self.files.url(shard))
        return self._headers[shard]

    def info(self, name: str) -> TensorInfo:
        """Where a stored tensor lives (for a pack-quantized `<m>.weight`: its `weight_packed` words)."""
        if name in self.packed:
            name = self.packed[name] + ".weight_packed"
        shard = self.shard_of(name)
        infos = self.header(shard, name)
        stored = self.prefix + name
        if stored not in infos:
            raise CheckpointError(f"{self.files.url(shard)}: tensor {stored!r}, named by the index, is not in this shard")
        return infos[stored]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape as get() returns it (a packed weight's (out, in), from its weight_shape)."""
        if name in self.packed:
            return self._check_packed(name)
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (float8_e4m3fn for an fp8 weight, int32 for a packed one)."""
        return self.info(name).torch_dtype

    def is_fp8(self, name: str) -> bool:
        return name not in self.packed and self.info(name).dtype in FP8_DTYPES

    def is_packed(self, name: str) -> bool:
        """Whether `name` is stored pack-quantized (compressed-tensors: weight_packed / _scale / _shape)."""
        return name in self.packed

    def check(self, name: str, shape=None, floating: bool = False) -> TensorInfo:
        """Validate one tensor without reading its data: fp8 scale present and of the right shape, and
        optionally its shape and a floating-point dtype. Raises CheckpointError naming file and tensor."""
        if name in self.packed:
            got = self._check_packed(name)
            if shape is not None and got != tuple(shape):
                info = self.info(name + "_shape")
                raise CheckpointError(f"{info.file}: tensor {info.name!r} says {got}, the config needs {tuple(shape)}")
            return self.info(name)
        info = self.info(name)
        where = f"{info.file}: tensor {info.name!r}"
        sname = scale_name(name)
        if info.dtype in FP8_DTYPES:
            if len(info.shape) != 2:
                raise CheckpointError(f"{where} is {info.dtype} with shape {info.shape}; fp8 weights must be 2-D")
            if sname not in self.weight_map:
                raise CheckpointError(f"{where} is {info.dtype} but the checkpoint has no {sname}")
            s = self.info(sname)
            want = scale_shape(info.shape, self.block)
            if s.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{s.file}: tensor {sname!r} has dtype {s.dtype}; block scales are floats")
            if s.shape != want:
                raise CheckpointError(
                    f"{s.file}: tensor {sname!r} has shape {s.shape}, but its weight {name} {info.shape} "
                    f"needs {want} ({self.block[0]}x{self.block[1]} blocks)"
                )
        elif sname in self.weight_map:
            raise CheckpointError(f"{where} has a block scale {sname} but is stored as {info.dtype}, not fp8")
        if floating and info.dtype not in FLOAT_DTYPES + FP8_DTYPES:
            raise CheckpointError(f"{where} has dtype {info.dtype}; expected a floating-point tensor")
        if shape is not None and info.shape != tuple(shape):
            raise CheckpointError(f"{where} has shape {info.shape}, the config needs {tuple(shape)}")
        return info

    # ----------------------------------------------------------------- reading
    def get(self, name: str, dtype: torch.dtype = torch.float32, rows=None, out: torch.Tensor | None = None):
        """One tensor as `dtype` (fp8 weights dequantized); `rows` (a slice) reads only those rows.

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
        if name in self.packed:
            return self._get_packed(name, dtype, rows, out)
        info = self.check(name)
        r0, r1 = _row_range(info, rows)
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        if out is not None:
            if not _writable_in_place(out, shape, info.file, name):
                return out.copy_(self._get(name, out.dtype, rows, None))
            dtype = out.dtype
        fp8 = info.dtype in FP8_DTYPES
        if fp8 and dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"{name}: use read_raw() for the stored float8 bytes; get() dequantizes them")
        if not fp8 and info.torch_dtype == dtype:  # no conversion: read straight into the result
            if out is None:
                out = torch.empty(shape, dtype=dtype)
            self._readinto(info, info.start + r0 * info.row_bytes, _bytes_of(out))
            return out
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        if not info.shape:
            return out.copy_(self.read_raw(name))
        scale = self._scale(name) if fp8 else None
        for a, b, piece in self._pieces(info, r0, r1):
            dst = out[a - r0 : b - r0]
            if fp8:
                dequantize_fp8(piece, scale, self.block, row_start=a, out=dst)
            else:
                dst.copy_(piece)
        return out

    def read_raw(self, name: str, rows=None) -> torch.Tensor:
        """The stored tensor (float8 bytes as float8_e4m3fn), rows optionally sliced."""
        if name in self.packed:
            raise ValueError(f"{name} is stored pack-quantized: read_raw() its parts {name}_packed, _scale, _shape")
        info = self.check(name)
        r0, r1 = _row_range(info, rows)
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        out = torch.empty(shape, dtype=info.torch_dtype)  # not a bytearray: no zero-filling pass
        if out.numel():
            self._readinto(info, info.start + r0 * info.row_bytes, _bytes_of(out))
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
        sizes = [sum(self.info(n).nbytes for n in self._with_scales(name)) for name in names]
        ahead, j = 0, 1  # names[i + 1 : j] are hinted, `ahead` bytes in all
        for i, name in enumerate(names):
            while j < len(names) and ahead < window:
                self.will_need(names[j])
                ahead += sizes[j]
                j += 1
            yield name
            if i + 1 < j:
                ahead -= sizes[i + 1]

    def _with_scales(self, name: str) -> tuple[str, ...]:
        if name in self.packed:
            return tuple(f"{self.packed[name]}.{p}" for p in int4.PARTS)
        return (name, scale_name(name)) if self.is_fp8(name) else (name,)

    def will_need(self, name: str) -> None:
        """Hint that tensor `name` (and its fp8 scales) will be read next: a local file starts loading
        those bytes in the background; no memory of this process is used. A no-op for remote sources."""
        for n in self._with_scales(name):
            info = self.info(n)
            self._file(self.shard_of(n)).will_need(info.start, info.nbytes)

    @property
    def bytes_read(self) -> int:
        """Bytes fetched so far: json files, shard headers and tensor data."""
        return self._closed_bytes + sum(f.bytes_read for f in self._open.values())

    def close(self):
        for f in self._open.values():
            self._closed_bytes += f.bytes_read
            f.close()
        self._open.clear()
        self._scratch = bytearray(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"CheckpointReader({self.source!r}, {len(self.weight_map)} tensors in {len(self.shards())} shards)"

    # ----------------------------------------------------------------- internals
    def _read_json(self, name: str, missing_ok: bool = False) -> dict | None:
        url = self.files.url(name)
        try:
            raw = self.files.read_file(name)
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

    def _read_weight_map(self) -> dict[str, str]:
        index = self._read_json(INDEX, missing_ok=True)
        if index is None:
            try:
                self._open[SINGLE] = self.files.open(SINGLE)
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

    def _file(self, shard: str, for_tensor: str | None = None):
        if shard not in self._open:
            try:
                self._open[shard] = self.files.open(shard)
            except FileNotFoundError:
                why = f" (it holds tensor {for_tensor!r})" if for_tensor else ""
                raise CheckpointError(f"{self.files.url(shard)}: missing{why}") from None
        return self._open[shard]

    def _readinto(self, info: TensorInfo, offset: int, buffer):
        try:
            with _naming(info.name):
                self._file(self.index[info.name]).readinto(offset, buffer)
        except EOFError as e:
            raise CheckpointError(f"{info.file}: tensor {info.name!r}: the file is shorter than its header says ({e})") from None

    def _pieces(self, info: TensorInfo, r0: int, r1: int):
        """Rows [r0, r1) in pieces of about read_piece_bytes, read into one reused buffer."""
        step = max(1, self.files.read_piece_bytes // max(info.row_bytes, 1))
        if step > self.block[0]:
            step -= step % self.block[0]  # whole fp8 block rows per piece
        need = min(step, r1 - r0) * info.row_bytes
        if len(self._scratch) < need:
            self._scratch = bytearray(need)
        view = memoryview(self._scratch)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            buf = view[: (b - a) * info.row_bytes]
            self._readinto(info, info.start + a * info.row_bytes, buf)
            if b < r1:  # the next piece loads while this one is converted
                self._file(self.index[info.name]).will_need(info.start + b * info.row_bytes, buf.nbytes)
            yield a, b, decode(buf, info.dtype, (b - a, *info.shape[1:]))

    def _check_packed(self, name: str) -> tuple[int, int]:
        """Validate a pack-quantized weight's three parts against each other and the checkpoint's
        scheme (headers and the 2-number weight_shape only); returns its (out, in)."""
        if name in self._packed_shapes:
            return self._packed_shapes[name]
        base = self.packed[name]
        if self.pack_scheme is None:
            raise CheckpointError(
                f"{self.info(name).file}: tensor {self.prefix}{base}.weight_packed is pack-quantized, but config.json's "
                "quantization_config does not say compressed-tensors pack-quantized"
            )
        for part, why in int4.UNSUPPORTED_PARTS.items():
            if f"{base}.{part}" in self.weight_map:
                raise CheckpointError(f"{self.info(f'{base}.{part}').file}: tensor {self.prefix}{base}.{part}: {why} not supported")
        for part in int4.PARTS:
            if f"{base}.{part}" not in self.weight_map:
                raise CheckpointError(
                    f"{self.info(name).file}: tensor {self.prefix}{base}.weight_packed has no {self.prefix}{base}.{part} in the checkpoint"
                )
        packed, scale, shape = (self.info(f"{base}.{p}") for p in int4.PARTS)
        scheme = self.pack_scheme
        if packed.dtype != "I32" or len(packed.shape) != 2:
            raise CheckpointError(f"{packed.file}: tensor {packed.name!r} is {packed.dtype} {packed.shape}; packed weights are 2-D I32")
        if scale.dtype not in FLOAT_DTYPES or len(scale.shape) != 2:
            raise CheckpointError(f"{scale.file}: tensor {scale.name!r} is {scale.dtype} {scale.shape}; scales are 2-D floats")
        if shape.dtype not in ("I32", "I64") or shape.shape != (2,):
            raise CheckpointError(f"{shape.file}: tensor {shape.name!r} is {shape.dtype} {shape.shape}; expected I32 or I64 (2,)")
        raw = self.read_raw(f"{base}.weight_shape")
        out_f, in_f = (int(v) for v in raw)
        if out_f < 0 or in_f < 0 or packed.shape != scheme.packed_shape((out_f, in_f)):
            raise CheckpointError(
                f"{packed.file}: tensor {packed.name!r} has shape {packed.shape}, but {shape.file}: tensor "
                f"{shape.name!r} says {(out_f, in_f)}, which packs to {scheme.packed_shape((max(out_f, 0), max(in_f, 0)))} "
                f"(int{scheme.num_bits})"
            )
        if scale.shape != scheme.scale_shape((out_f, in_f)):
            raise CheckpointError(
                f"{scale.file}: tensor {scale.name!r} has shape {scale.shape}, but its weight {(out_f, in_f)} "
                f"needs {scheme.scale_shape((out_f, in_f))} ({scheme.describe()})"
            )
        self._packed_shapes[name] = (out_f, in_f)
        return out_f, in_f

    def _get_packed(self, name: str, dtype, rows, out):
        """A pack-quantized weight (or its rows), dequantized piece by piece into the result."""
        shape = self._check_packed(name)
        packed = self.info(name)
        r0, r1 = _row_range(packed, rows)
        want = (r1 - r0, shape[1])
        if out is not None:
            if not _writable_in_place(out, want, packed.file, name):
                return out.copy_(self._get_packed(name, out.dtype, rows, None))
            dtype = out.dtype
        if not dtype.is_floating_point or dtype.itemsize == 1:
            raise ValueError(f"{name}: get() dequantizes packed weights to a float dtype, not {dtype}")
        if out is None:
            out = torch.empty(want, dtype=dtype)
        sname = self.packed[name] + ".weight_scale"
        scale = self.read_raw(sname, rows=slice(r0, r1))
        if not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"{self.info(sname).file}: tensor {self.prefix}{sname!r} holds non-finite scales")
        for a, b, piece in self._pieces(packed, r0, r1):
            int4.dequantize_packed(piece, scale[a - r0 : b - r0], self.pack_scheme, shape[1], out=out[a - r0 : b - r0])
        return out

    def _scale(self, name: str) -> torch.Tensor:
        sname = scale_name(name)
        s = self.get(sname, torch.float32)
        if not bool(torch.isfinite(s).all()):
            raise CheckpointError(f"{self.info(sname).file}: tensor {sname!r} holds non-finite block scales")
        return s


@contextmanager
def _naming(tensor: str | None):
    """A NetworkError raised inside also names the tensor being read."""
    try:
        yield
    except NetworkError as e:
        if tensor is None or "reading tensor" in str(e):
            raise
        raise NetworkError(f"{e} (reading tensor {tensor!r})") from e


def _writable_in_place(out: torch.Tensor, shape: tuple, file, name: str) -> bool:
    """A caller's destination of the wrong shape is an error naming the tensor; True when the result
    can be read straight into it (contiguous, on the CPU), False when it must be made apart and copied."""
    if tuple(out.shape) != tuple(shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(shape)}, the destination {tuple(out.shape)}")
    return out.device.type == "cpu" and out.is_contiguous()


def _row_range(info: TensorInfo, rows) -> tuple[int, int]:
    if not info.shape:
        if rows is not None:
            raise ValueError(f"{info.name}: a 0-d tensor has no rows to slice")
        return 0, 0
    if rows is None:
        return 0, info.shape[0]
    if isinstance(rows, tuple):
        rows = slice(*rows)
    if not isinstance(rows, (slice, range)):
        raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
    r = range(info.shape[0])[rows] if isinstance(rows, slice) else rows
    if r.step != 1 or r.start < 0 or r.stop > info.shape[0]:
        raise ValueError(f"{info.name}: rows {rows} is not a contiguous range of its {info.shape[0]} rows")
    return r.start, max(r.start, r.stop)


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


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


def _pack_scheme(config: dict, where: str) -> int4.PackScheme | None:
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != int4.QUANT_METHOD:
        return None
    try:
        return int4.scheme_from_config(q, where)
    except int4.QuantizationConfigError as e:
        raise CheckpointError(str(e)) from None


def _packed_weights(weight_map: dict, where: str) -> dict[str, str]:
    """"<m>.weight" -> "<m>" for every `<m>.weight_packed` (a plain `<m>.weight` beside it is an error)."""
    packed = {}
    for k in weight_map:
        if k.endswith(".weight_packed"):
            base = k[: -len(".weight_packed")]
            if base + ".weight" in weight_map:
                raise CheckpointError(f"{where}: tensor {base}.weight is stored both plain and packed ({k})")
            packed[base + ".weight"] = base
    return packed


def _block_size(config: dict, where: str) -> tuple[int, int]:
    q = config.get("quantization_config")
    if not q or (isinstance(q, dict) and q.get("quant_method") == int4.QUANT_METHOD):
        return BLOCK
    block = q.get("weight_block_size", list(BLOCK)) if isinstance(q, dict) else None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive integers")
    return tuple(block)
