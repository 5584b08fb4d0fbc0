"""CheckpointReader: single tensors (or row slices of them) out of a HF-format safetensors checkpoint,
on demand, from a local directory, `hf://owner/repo` or an http(s) base URL.

It reads config.json and model.safetensors.index.json (or a single model.safetensors) when opened, and
a shard's header only when a tensor of that shard is first asked for. A tensor read fetches that
tensor's bytes and nothing else; fp8 weights (`F8_E4M3` + `<name>_scale_inv`) come back dequantized to
the requested dtype. Every header is validated against the file size before any of its bytes are used.
"""

from __future__ import annotations

import json
import posixpath
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

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
            self.config = self._read_json(CONFIG)
            self.block = _block_size(self.config, self.files.url(CONFIG))
            self.weight_map = self._read_weight_map()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- what is there
    def keys(self) -> list[str]:
        """Tensor names, without the `_scale_inv` companions of fp8 weights (they are part of them)."""
        return [k for k in self.weight_map if not (is_scale(k) and k[: -len(SCALE_SUFFIX)] in self.weight_map)]

    def stored_keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shard_of(self, name: str) -> str:
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
        shard = self.shard_of(name)
        infos = self.header(shard, name)
        if name not in infos:
            raise CheckpointError(f"{self.files.url(shard)}: tensor {name!r}, named by the index, is not in this shard")
        return infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (float8_e4m3fn for an fp8 weight)."""
        return self.info(name).torch_dtype

    def is_fp8(self, name: str) -> bool:
        return self.info(name).dtype in FP8_DTYPES

    def check(self, name: str, shape=None, floating: bool = False) -> TensorInfo:
        """Validate one tensor without reading its data: fp8 scale present and of the right shape, and
        optionally its shape and a floating-point dtype. Raises CheckpointError naming file and tensor."""
        info = self.info(name)
        where = f"{info.file}: tensor {name!r}"
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
        info = self.check(name)
        r0, r1 = _row_range(info, rows)
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        if out is not None:
            if tuple(out.shape) != shape:
                raise CheckpointError(f"{info.file}: tensor {name!r} has shape {shape}, the destination {tuple(out.shape)}")
            if out.device.type != "cpu" or not out.is_contiguous():
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
        return (name, scale_name(name)) if self.is_fp8(name) else (name,)

    def will_need(self, name: str) -> None:
        """Hint that tensor `name` (and its fp8 scales) will be read next: a local file starts loading
        those bytes in the background; no memory of this process is used. A no-op for remote sources."""
        for n in self._with_scales(name):
            info = self.info(n)
            self._file(self.weight_map[n]).will_need(info.start, info.nbytes)

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
                self._file(self.weight_map[info.name]).readinto(offset, buffer)
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
                self._file(self.weight_map[info.name]).will_need(info.start + b * info.row_bytes, buf.nbytes)
            yield a, b, decode(buf, info.dtype, (b - a, *info.shape[1:]))

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


def _block_size(config: dict, where: str) -> tuple[int, int]:
    q = config.get("quantization_config")
    if not q:
        return BLOCK
    block = q.get("weight_block_size", list(BLOCK)) if isinstance(q, dict) else None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive integers")
    return tuple(block)
