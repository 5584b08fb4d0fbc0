"""save_pretrained: K2ForCausalLM -> a HF-format checkpoint that transformers loads (per-expert names,
sharded safetensors + index), optionally quantized the way Kimi-K2 (fp8) or Kimi-K2-Thinking (INT4
experts, compressed-tensors pack-quantized) publish their weights.

The checkpoint is written into a hidden temporary directory beside `path`
(`.<name>.saving-p<pid>-<random>.tmp`), flushed to disk, and only then swapped with `path`: an
interrupted save never leaves a directory that looks like a checkpoint, and a reader of `path` finds
the old checkpoint or the new one at every instant (on Linux the swap is one atomic `renameat2`
exchange; elsewhere two renames, the old checkpoint moved aside to `.<name>.old-p<pid>-<random>.tmp`
first). Saves into one `path` take turns (a lock file `.<name>.lock` beside it, held for the save).
The next save into `path` removes the temporary directories of saves whose process is gone, and
puts back an old checkpoint that a kill between the two renames left aside (`repair_interrupted_swap`,
which load_pretrained also runs when `path` is missing). Over an existing `path`, only its previous checkpoint is
replaced: config.json, the index and the shards the index names; every other file is carried over, and
a config.json without an index (a checkpoint save_pretrained did not write) is never replaced.
Shards are written by the safetensors library (metadata {"format": "pt"}), which takes a whole file's
tensors at once: memory stays at the model plus the converted tensors of one shard (`max_shard_bytes`).
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import locks
from ..atomic import DISK_ERRNOS, WriteError, disk_errors, temp_dir
from ..presets import K2_QUANTIZATION_CONFIG
from . import int4
from .fp8 import quantize_fp8, scale_shape
from .names import EXPERT_RE, hf_tensors, is_fp8_quantized, scale_name
from .reader import CONFIG, INDEX
from .safetensors_format import DTYPE_NAMES, DTYPES

QUANTIZATIONS = (None, "fp8", "int4")


def save_pretrained(
    model,
    path,
    fp8: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    quantization: str | None = None,
) -> Path:
    """Write `model` as config.json + model-0000i-of-0000N.safetensors + model.safetensors.index.json.

    quantization: None (as the model is), "fp8" (Kimi-K2's layout) or "int4" (Kimi-K2-Thinking's).
    "fp8" (or fp8=True): every attention and FFN Linear weight (dense, routed and shared experts) as
        float8_e4m3fn with a float32 `<name>_scale_inv` per 128x128 block.
    "int4": the routed experts as compressed-tensors pack-quantized INT4 (int32 `weight_packed`, bf16
        `weight_scale` per 32 columns, int32 `weight_shape`), everything else bfloat16 unless `dtype`
        says otherwise (int4.quantize_packed is the quantizer).
    Either way config.json's quantization_config says so. dtype: dtype of the other tensors (default:
    as in the model; bfloat16 for "int4"); the router's correction bias stays float32. In an existing
    `path`, the previous checkpoint (config.json, model.safetensors.index.json and the shards it names)
    is replaced and every other file (tokenizer, README, a model_backup.safetensors) carried over; a
    config.json there without an index is someone else's checkpoint: FileExistsError.
    A tensor holding inf or nan is a ValueError, before anything is written; so is a model whose
    experts are sharded over processes (k2mini.parallel.shard_experts). Concurrent saves into one
    `path` take turns; a full disk is a `k2mini.atomic.WriteError` naming the file, `path` untouched.
    """
    if getattr(model, "expert_parallel", None) is not None:
        raise ValueError(
            "save_pretrained: this model's routed experts are sharded over processes (k2mini.parallel.shard_experts), "
            "so each process holds only some of them; save the model before shard_experts, or copy every rank's "
            "experts into one unsharded K2ForCausalLM and save that"
        )
    if fp8 and quantization not in (None, "fp8"):
        raise ValueError(f"fp8=True and quantization={quantization!r} disagree; pass one of them")
    quantization = "fp8" if fp8 else quantization
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "int4" and dtype is None:
        dtype = torch.bfloat16  # K2-Thinking keeps everything but the routed experts in bf16
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")
    groups = _plan(model, quantization, dtype)
    _check_finite(groups)
    shards = _split(groups, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with locks.hold(_lock_path(path), f"save_pretrained into {path}", blocking=True):  # saves take turns
        repair_interrupted_swap(path)
        _remove_interrupted_saves(path)
        previous = _previous_output(path)
        _save(model, path, quantization, dtype, groups, shards, names, previous, progress)
    return path


def _save(model, path: Path, quantization, dtype, groups, shards, names, previous, progress) -> None:
    # it becomes `path`: not private like mkdtemp's; the pid says whether its writer is still alive
    tmp = temp_dir(path.parent, f".{path.name}{SAVING}p{os.getpid()}-")
    try:
        config = model.config.to_hf()
        config.pop("quantization_config", None)
        config["dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
        if quantization == "fp8":
            config["quantization_config"] = dict(K2_QUANTIZATION_CONFIG)
        elif quantization == "int4":
            config["quantization_config"] = json.loads(json.dumps(int4.K2_THINKING_QUANTIZATION_CONFIG))
        _write_file(tmp / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), path / CONFIG)
        mode = stat.S_IMODE(os.stat(tmp / CONFIG).st_mode)  # what the umask gives a new file
        weight_map = {}
        bar = tqdm(total=sum(_group_bytes(g) for g in groups), unit="B", unit_scale=True, desc="saving", disable=not progress)
        for name, shard in zip(names, shards):
            _write_shard(tmp / name, shard, bar, path / name)
            os.chmod(tmp / name, mode)  # the safetensors library creates its files 0600
            weight_map.update({t[0]: name for g in shard for t in g["tensors"]})
        bar.close()
        index = {"metadata": {"total_size": sum(_group_bytes(g) for g in groups)}, "weight_map": dict(sorted(weight_map.items()))}
        _write_file(tmp / INDEX, (json.dumps(index, indent=2) + "\n").encode(), path / INDEX)
        if path.exists():
            with disk_errors(path):
                _carry_over(path, tmp, previous)
        _fsync_dir(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plan(model, quantization, dtype) -> list[dict]:
    """One group per HF weight (quantized: its parts, kept in the same shard)."""
    groups = []
    for hf, source in hf_tensors(model):
        shape = tuple(source.shape)
        if quantization == "fp8" and is_fp8_quantized(hf):
            entries = [(hf, "F8_E4M3", shape), (scale_name(hf), "F32", scale_shape(shape))]
        elif quantization == "int4" and EXPERT_RE.match(hf):
            base, scheme = hf[: -len(".weight")], int4.PackScheme()
            entries = [(f"{base}.weight_packed", "I32", scheme.packed_shape(shape)),
                       (f"{base}.weight_scale", "BF16", scheme.scale_shape(shape)), (f"{base}.weight_shape", "I32", (2,))]
        else:
            out = torch.float32 if hf.endswith("e_score_correction_bias") else (dtype or source.dtype)
            entries = [(hf, DTYPE_NAMES[out], tuple(source.shape))]
        groups.append({"tensors": entries, "source": source})
    return groups


def _check_finite(groups) -> None:
    """ValueError naming the first tensor holding inf or nan: a diverged model is not exported (its fp8
    scales would be nan too, and load_pretrained refuses a non-finite correction bias)."""
    for g in groups:
        if g["source"].is_floating_point() and not bool(torch.isfinite(g["source"]).all()):
            raise ValueError(f"save_pretrained: tensor {g['tensors'][0][0]!r} holds inf or nan; nothing was written")


def _group_bytes(group) -> int:
    return sum(math.prod(shape) * DTYPES[dt].itemsize for _, dt, shape in group["tensors"])


def _split(groups, max_shard_bytes) -> list[list[dict]]:
    shards, size = [[]], 0
    for g in groups:
        n = _group_bytes(g)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += n
    return shards


def _produce(group) -> list[torch.Tensor]:
    (hf, dtype, shape), *rest = group["tensors"]
    w = group["source"].detach()
    if dtype == "F8_E4M3":
        return list(quantize_fp8(w))
    if dtype == "I32" and hf.endswith(".weight_packed"):
        packed, scale, shape = int4.quantize_packed(w, int4.PackScheme(), torch.bfloat16)
        return [packed, scale, shape.to(torch.int32)]
    # an expert is a view of one stacked parameter: a copy of its own, as the safetensors library
    # refuses tensors that share storage
    t = w.to("cpu", DTYPES[dtype])
    return [t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t]


def _write_shard(path: Path, groups, bar, final: Path):
    tensors = {}
    for g in groups:
        for (name, dtype, shape), t in zip(g["tensors"], _produce(g)):
            assert DTYPE_NAMES[t.dtype] == dtype and tuple(t.shape) == shape, name
            tensors[name] = t.contiguous()
        bar.update(_group_bytes(g))
    write_safetensors(path, tensors, final)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], final: Path | None = None) -> None:
    """One safetensors file by the safetensors library itself (metadata {"format": "pt"}, as
    transformers and the hub tooling expect), flushed to disk. A full disk (or quota, read-only file
    system, size limit) is a WriteError naming `final` (the file's eventual name; default `path`)."""
    from safetensors.torch import save_file

    final = path if final is None else final
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except OSError:
        with disk_errors(final):
            raise
    except Exception as e:  # safetensors' own SafetensorError wraps the io error as text
        code = _io_errno(str(e))
        if code in DISK_ERRNOS:
            raise WriteError(code, os.strerror(code), os.fspath(final)) from e
        raise
    with disk_errors(final):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _io_errno(message: str) -> int | None:
    """The errno in a Rust io::Error's text ("I/O error: ... (os error 28)", or "Os { code: 28, ... }")."""
    m = re.search(r"\bos error (\d+)|\bcode: (\d+)", message)
    return int(m.group(1) or m.group(2)) if m else None


def _write_file(path: Path, data: bytes, final: Path | None = None):
    with disk_errors(path if final is None else final):
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


SAVING = ".saving-"  # temporary directories are `.<name>.saving-p<pid>-<random>.tmp` beside the checkpoint
OLD = ".old-"  # where the two-rename swap moves the old checkpoint: `.<name>.old-p<pid>-<random>.tmp/<name>`
_WRITER = re.compile(r"^p(\d+)-")


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _writer_gone(folder: Path, marker: str) -> bool:
    """Whether the save that made `folder` (named `.<name><marker>p<pid>-...`) has ended: its process
    is gone, or it is this one (saves into one path take turns, so not a save still running), or the
    name carries no pid (an older k2mini's)."""
    m = _WRITER.match(folder.name.split(marker, 1)[1])
    if m is None:
        return True
    pid = int(m.group(1))
    return pid == os.getpid() or not locks.process_alive(pid)


def _previous_output(path: Path) -> set[str]:
    """Names in `path` that its previous checkpoint consists of (what a new save replaces); raises
    FileExistsError, before anything is written, if `path` holds a checkpoint without a readable index."""
    if not path.is_dir():
        return set()
    index = path / INDEX
    if not index.exists():
        if (path / CONFIG).exists():
            raise FileExistsError(
                f"{path / CONFIG}: a checkpoint not written by save_pretrained (it has no {INDEX}); "
                "refusing to replace it: save into another directory or remove it first"
            )
        return set()
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        shards = {s for s in shards if isinstance(s, str) and os.path.basename(s) == s}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise FileExistsError(
            f"{index}: unreadable ({type(e).__name__}), so which files are the old checkpoint is unknown; "
            "refusing to replace them: save into another directory or fix the index"
        ) from None
    return {CONFIG, INDEX} | shards


def _remove_interrupted_saves(path: Path) -> None:
    """Temporary directories an interrupted (killed) save into `path` left beside it; a save still
    running in another process keeps its own."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}{SAVING}*.tmp"):
        if leftover.is_dir() and not leftover.is_symlink() and _writer_gone(leftover, SAVING):
            shutil.rmtree(leftover, ignore_errors=True)


def _asides(path: Path) -> list[Path]:
    return sorted(d for d in path.parent.glob(f".{glob.escape(path.name)}{OLD}*")
                  if d.is_dir() and not d.is_symlink() and _writer_gone(d, OLD))


def repair_interrupted_swap(path) -> bool:
    """After a save was killed between the two renames of its swap (`path` moved aside, the new
    checkpoint not yet in place), put the old checkpoint back at `path`; remove old checkpoints whose
    swap did complete. Call it holding the save lock. Returns whether `path` was put back."""
    path = Path(path)
    restored = False
    for aside in _asides(path):
        old = aside / path.name
        if not path.exists() and old.is_dir():
            os.rename(old, path)
            restored = True
        shutil.rmtree(aside, ignore_errors=True)
    return restored


def repair_before_load(path) -> None:
    """load_pretrained's part: if the checkpoint directory `path` is missing and an interrupted swap
    left it aside, put it back (under the save lock, so a save in progress finishes first)."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return
    if not any(path.parent.glob(f".{glob.escape(path.name)}{OLD}*")):
        return
    try:
        with locks.hold(_lock_path(path), f"save_pretrained into {path}", blocking=True):
            repair_interrupted_swap(path)
    except OSError:  # a folder we may not write: the reader's own error will say what is missing
        pass


def _carry_over(old: Path, new: Path, previous: set[str]):
    for entry in old.iterdir():
        if entry.name in previous:
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name)
            continue
        try:
            os.link(entry, new / entry.name)  # the same bytes, without copying them
        except OSError:
            shutil.copy2(entry, new / entry.name)


def _swap_in(tmp: Path, path: Path):
    """Put the finished directory at `path`. Over an old checkpoint: one atomic exchange where the
    system has it (tmp then holds the old one, removed after), else two renames: the old one is moved
    aside first (and back, should the second rename fail), then removed; a kill between the two is
    repaired by the next save or load (`repair_interrupted_swap`)."""
    if not path.exists():
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        return
    if _exchange(tmp, path):
        _fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = temp_dir(path.parent, f".{path.name}{OLD}p{os.getpid()}-")
    os.rename(path, aside / path.name)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside / path.name, path)
        aside.rmdir()
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a C library without it (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
