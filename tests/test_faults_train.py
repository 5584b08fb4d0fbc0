"""Fault injection, training side: two runs into one checkpoint_dir, a kill in the middle of a save,
a save that fails, and a full disk under every file a run writes (checkpoints, the run cache, a sweep,
analysis results). Each of these failed before the run lock, WriteError and the sweep's warning."""

import errno
import os
import signal

import pandas as pd
import pytest
import torch

import k2mini
import k2mini.atomic
from faults_helpers import TEXT, TINY_CONFIG, TRAIN_CHILD, FullDiskOs, file_size_limit, start, wait_for
from k2mini.locks import LockedError
from k2mini.run.resume_state import save_checkpoint
from k2mini.training import TrainConfig, train

SETTINGS = dict(batch_size=2, seq_len=16, eval_every=0, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def data(corpus):
    return k2mini.make_dataset(k2mini.load_corpus(str(corpus)), val_fraction=0.1, block_size=256)


def tiny(seed=0):
    torch.manual_seed(seed)
    return k2mini.K2ForCausalLM(k2mini.K2Config.preset("k2-micro").replace(**TINY_CONFIG))


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


# ---------------------------------------------------------------------------------------------- two runs


@pytest.mark.multiprocess
def test_a_second_process_training_into_a_busy_checkpoint_dir_is_refused_naming_the_first(data, corpus, tmp_path):
    """Used to: both runs "completed", one run's checkpoints lost, temporary files left behind."""
    ck, flag = tmp_path / "ck", tmp_path / "training"
    child = start(TRAIN_CHILD, ck, corpus, "hold", flag)
    try:
        wait_for(flag, child)  # the child is inside train(), holding ck
        m = tiny(1)
        with pytest.raises(LockedError, match=rf"checkpoint_dir .*ck.* is in use by pid {child.pid} on host "):
            train(m, data, adamw(m), 2, checkpoint_dir=ck, overwrite=True, checkpoint_every=1, **SETTINGS)
    finally:
        flag.unlink(missing_ok=True)
        out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and out.strip() == "completed", err
    assert sorted(os.listdir(ck)) == ["last.pt", "prev.pt"]  # the first run's, whole; the lock released
    assert torch.load(ck / "last.pt", weights_only=True)["step"] == 2


def test_a_second_run_in_the_same_process_is_refused_too(data, tmp_path):
    m, other = tiny(0), tiny(1)

    def second_run(step, row):
        if step == 0:
            with pytest.raises(LockedError, match=rf"in use by pid {os.getpid()} "):
                train(other, data, adamw(other), 1, checkpoint_dir=tmp_path, overwrite=True, **SETTINGS)

    h = train(m, data, adamw(m), 2, checkpoint_dir=tmp_path, callback=second_run, **SETTINGS)
    assert h.attrs["stop_reason"] == "completed" and sorted(os.listdir(tmp_path)) == ["last.pt"]


# ---------------------------------------------------------------------------------------------- kills


@pytest.mark.multiprocess
def test_a_run_killed_in_the_middle_of_a_save_leaves_a_directory_the_next_run_takes_over(data, corpus, tmp_path):
    """A kill -9 during torch.save leaves its temporary file and the lock file; the next run takes the
    lock over (its holder is gone), resumes from the last whole checkpoint, and removes the debris."""
    child = start(TRAIN_CHILD, tmp_path, corpus, "kill-in-save", tmp_path / "unused")
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    assert [p for p in os.listdir(tmp_path) if p.startswith(".last.pt.")], "the kill came before the save began"
    m = tiny(0)
    h = train(m, data, adamw(m), 3, checkpoint_dir=tmp_path, resume=True, checkpoint_every=1, **SETTINGS)
    assert h.attrs["stop_reason"] == "completed" and list(h["step"]) == [0, 1, 2]  # step 0 came from the checkpoint
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "prev.pt"]


def test_a_failed_save_leaves_no_temporary_copy_of_prev(data, tmp_path, monkeypatch):
    """After a save that failed, last.pt and prev.pt are one file; the next save's rename of a copy onto
    prev.pt then did nothing and the copy (.prev.pt.*.tmp, a whole checkpoint) stayed forever."""
    m = tiny()
    opt = adamw(m)
    cfg = TrainConfig(steps=3)
    path = tmp_path / "last.pt"
    save_checkpoint(path, m, opt, 0, [], cfg)
    with monkeypatch.context() as mp:
        mp.setattr(k2mini.atomic, "os", FullDiskOs(room=100))
        with pytest.raises((OSError, RuntimeError)):
            save_checkpoint(path, m, opt, 1, [], cfg)
    assert os.path.samefile(path, tmp_path / "prev.pt")
    save_checkpoint(path, m, opt, 2, [], cfg)
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "prev.pt"]
    assert torch.load(tmp_path / "prev.pt", weights_only=True)["step"] == 0


# ---------------------------------------------------------------------------------------------- full disks


def test_a_full_disk_during_a_training_checkpoint_names_the_file_and_the_cause(data, tmp_path, monkeypatch):
    """Used to be torch's "[enforce fail at inline_container.cc:...] unexpected pos", naming neither."""
    m = tiny()
    monkeypatch.setattr(k2mini.atomic, "os", FullDiskOs(room=10_000))
    with pytest.raises(OSError) as e:
        train(m, data, adamw(m), 2, checkpoint_dir=tmp_path, checkpoint_every=1, **SETTINGS)
    assert e.value.errno == errno.ENOSPC and "inline_container" not in str(e.value)
    assert str(tmp_path / "last.pt") in str(e.value) and "No space left on device" in str(e.value)
    assert os.listdir(tmp_path) == []  # no temporary file, no lock


def test_a_full_disk_under_the_run_cache_names_the_file(tmp_path):
    from k2mini.lab.experiments import RunCache, RunResult, RunSpec, build_model

    spec = RunSpec(steps=1, config=TINY_CONFIG)
    result = RunResult(spec=spec, history=pd.DataFrame({"step": [0], "train_loss": [5.0]}), diverged=False,
                       stop_reason="completed", total_heads=8, wall_s=1.0, state=build_model(spec).state_dict())
    cache = RunCache(tmp_path)
    with file_size_limit(16_384), pytest.raises(OSError) as e:
        cache.put(result)
    assert e.value.errno == errno.EFBIG and str(cache.path(spec).with_suffix(".pt")) in str(e.value)
    assert "inline_container" not in str(e.value) and os.listdir(tmp_path) == []


def test_a_sweep_keeps_a_trained_run_whose_cache_entry_could_not_be_written(data, tmp_path):
    """Used to abort the sweep and lose the run just trained."""
    from k2mini.lab.experiments import RunSpec, run_sweep

    spec = RunSpec(steps=2, batch_size=2, seq_len=16, eval_every=0, config=TINY_CONFIG)
    with file_size_limit(16_384), pytest.warns(RuntimeWarning, match=r"trained but not cached: cannot write .*\.pt"):
        runs = run_sweep([spec], cache=tmp_path, data=data, progress=False)
    assert runs[0].stop_reason == "completed" and len(runs[0].history) == 2 and runs[0].model is not None
    assert os.listdir(tmp_path) == []


def test_a_full_disk_under_analysis_results_names_the_file(tmp_path):
    from k2mini.analysis.results_file import save_results

    target = tmp_path / "results.json"
    with file_size_limit(16_384), pytest.raises(OSError) as e:
        save_results(target, extra={"notes": "x" * 100_000})
    assert e.value.errno == errno.EFBIG and str(target) in str(e.value)
    assert os.listdir(tmp_path) == []


DDP_CHILD = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
import k2mini
from faults_helpers import TINY_CONFIG
from k2mini.locks import LockedError

ck, corpus = sys.argv[1:3]
dist.init_process_group("gloo")
data = k2mini.make_dataset(k2mini.load_corpus(corpus), val_fraction=0.1, block_size=256)
torch.manual_seed(0)
model = k2mini.K2ForCausalLM(k2mini.K2Config.preset("k2-micro").replace(**TINY_CONFIG))
rank = dist.get_rank()
try:
    k2mini.train(model, data, torch.optim.AdamW(model.parameters()), 2, batch_size=2, seq_len=16, eval_every=0,
                 checkpoint_dir=ck, overwrite=True, progress=False)
    said = f"rank {rank} trained"
except LockedError as e:
    said = f"rank {rank} refused: {e}"
# each rank's outcome in a file of its own (two ranks share torchrun's stdout), then on stdout for the log
out = Path(ck).parent / f"rank{rank}.txt"
out.with_suffix(".tmp").write_text(said)
out.with_suffix(".tmp").replace(out)
print(said, flush=True)
dist.destroy_process_group()
"""
@pytest.mark.multiprocess
@pytest.mark.slow
def test_under_torchrun_every_rank_is_refused_a_busy_checkpoint_dir_and_none_waits(corpus, tmp_path):
    """Rank 0 holds the directory for the run; when it cannot, the other ranks must not wait for it in
    DistributedDataParallel's first collective."""
    import subprocess
    import sys

    from faults_helpers import child_env
    from k2mini.run.checkpoint_dir import own_checkpoint_dir

    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    ck = tmp_path / "ck"
    with own_checkpoint_dir(ck):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0", "--rdzv-backend=c10d",
             "--rdzv-endpoint=127.0.0.1:0", str(script), str(ck), str(corpus)],
            env=child_env(), capture_output=True, text=True, timeout=120)
    said = sorted(tmp_path.glob("rank*.txt"))
    assert [p.name for p in said] == ["rank0.txt", "rank1.txt"], (done.returncode, done.stdout, done.stderr)
    lines = [p.read_text() for p in said]
    assert lines[0].startswith(f"rank 0 refused: checkpoint_dir {str(ck)!r} is in use by pid {os.getpid()} "), lines
    assert lines[1].startswith(f"rank 1 refused: rank 0: checkpoint_dir {str(ck)!r} is in use by pid {os.getpid()} "), lines
    assert os.listdir(ck) == []


def test_two_callers_of_pretrained_mini_at_once_train_it_once(tmp_path, monkeypatch):
    """Notebooks run two at a time: on a cold cache both trained the same mini, then raced to replace
    each other's folder. Now the second waits for the first and takes its checkpoint."""
    import threading
    import time

    from k2mini.lab import pretrained

    trained = []

    def fake_training(name, root, path, progress):  # stands in for 3 minutes of training
        trained.append(name)
        time.sleep(0.5)
        path.mkdir(parents=True)
        (path / "training.json").write_text("{}")
        return path

    monkeypatch.setattr(pretrained, "_train_and_save", fake_training)
    got = []
    callers = [threading.Thread(target=lambda: got.append(pretrained.pretrained_mini("k2-micro", root=tmp_path)))
               for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert trained == ["k2-micro"] and len(got) == 2 and got[0] == got[1]
    assert sorted(os.listdir(tmp_path / "minis")) == [got[0].name]  # no lock file left
