"""What the fault-injection tests share: a child Python process running a script, a file-size limit
(the kernel then refuses writes past it, as a full disk does), a disk that fills after some bytes,
and a tiny training setup."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3
TINY_CONFIG = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4)  # on k2-micro
TESTS = Path(__file__).resolve().parent


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def start(script: str, *args, **kwargs) -> subprocess.Popen:
    """A child `python -c script args...` (its stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run(script: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Until `path` exists (AssertionError with the child's output if it ends first or time runs out)."""
    import time

    end = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the child ended (rc {proc.returncode}) before {path.name}:\n{out}\n{err}")
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` in any file fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


class _FillingFile:
    """A file whose disk is full once `room` bytes were written to it: then write raises ENOSPC."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        if n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


class FullDiskOs:
    """Stands in for the `os` module of one k2mini module: every file it opens with os.fdopen fills up
    after `room` bytes (monkeypatch.setattr(module, "os", FullDiskOs(room)))."""

    def __init__(self, room: int):
        self.room = room

    def fdopen(self, fd, *args, **kwargs):
        return _FillingFile(os.fdopen(fd, *args, **kwargs), self.room)

    def __getattr__(self, name):
        return getattr(os, name)


# a child that trains the tiny model into a checkpoint_dir: `python -c TRAIN_CHILD ckdir corpus mode flag`
# mode "hold": at step 0, create `flag` and wait until the parent removes it
# mode "kill-in-save": the second checkpoint save writes a few bytes, then the process is killed (SIGKILL)
TRAIN_CHILD = """
import os, signal, sys, time
import torch
import k2mini
from faults_helpers import TINY_CONFIG

ckdir, corpus, mode, flag = sys.argv[1:5]
data = k2mini.make_dataset(k2mini.load_corpus(corpus), val_fraction=0.1, block_size=256)
torch.manual_seed(0)
model = k2mini.K2ForCausalLM(k2mini.K2Config.preset("k2-micro").replace(**TINY_CONFIG))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
callback = None
if mode == "hold":
    def callback(step, row):
        if step == 0:
            open(flag, "w").close()
            while os.path.exists(flag):
                time.sleep(0.05)
elif mode == "kill-in-save":
    saves = []
    def dying_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    real_save, torch.save = torch.save, dying_save
h = k2mini.train(model, data, opt, 3, batch_size=2, seq_len=16, eval_every=0, checkpoint_every=1,
                 checkpoint_dir=ckdir, overwrite=True, progress=False, callback=callback)
print(h.attrs["stop_reason"])
"""


# a child that saves into one path: `python -c SAVE_CHILD path mode`
# mode "repeat": save the tiny model 4 times, then print "ok"
# mode "exchange" / "two-renames": save the old checkpoint (seed 0), then save another (seed 1) and die
# (SIGKILL) in the middle of its swap; "two-renames" takes the swap that moves the old checkpoint aside
# first, as where the system has no atomic exchange, and dies between its two renames
SAVE_CHILD = """
import os, shutil, signal, sys
import torch
import k2mini
import k2mini.checkpoint.save as save_module
from faults_helpers import TINY_CONFIG

path, mode = sys.argv[1:3]

def tiny(seed):
    torch.manual_seed(seed)
    return k2mini.K2ForCausalLM(k2mini.K2Config.preset("k2-micro").replace(**TINY_CONFIG))

if mode == "repeat":
    model = tiny(os.getpid() % 7)
    for _ in range(4):
        k2mini.save_pretrained(model, path, progress=False)
    print("ok")
    sys.exit()
k2mini.save_pretrained(tiny(0), path, progress=False)
if mode == "two-renames" and hasattr(save_module, "_exchange"):
    save_module._exchange = lambda a, b: False
name = os.path.basename(path)
real_rename, real_rmtree = os.rename, shutil.rmtree

def rename(src, dst, *args, **kwargs):  # the two-rename swap: die once the old checkpoint is aside
    real_rename(src, dst, *args, **kwargs)
    if os.path.basename(dst) == name and ".old-" in os.fspath(dst):
        os.kill(os.getpid(), signal.SIGKILL)

def rmtree(p, *args, **kwargs):  # the atomic exchange: die before the old checkpoint is removed
    if ".saving-" in os.fspath(p) and os.path.exists(os.path.join(p, "config.json")):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(p, *args, **kwargs)

os.rename, shutil.rmtree = rename, rmtree
k2mini.save_pretrained(tiny(1), path, progress=False)
print("the save completed")
"""


def tiny_model(seed=0):
    import torch

    import k2mini

    torch.manual_seed(seed)
    return k2mini.K2ForCausalLM(k2mini.K2Config.preset("k2-micro").replace(**TINY_CONFIG))
