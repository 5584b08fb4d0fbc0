"""Fault injection, the rest: config sizes that disagree with the checkpoint's tensors or cannot fit in
memory, a sweep whose worker dies (killed, or started from a script read on stdin), and generate()
arguments that would silently do nothing. Each of these failed before (minutes of building, a pool
that never finished, no word at all)."""

import json
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch

from faults_helpers import TEXT, TINY_CONFIG, child_env, tiny_model
from k2mini.checkpoint import CheckpointError, load_pretrained, save_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_pretrained(tiny_model(), tmp_path_factory.mktemp("ckpt") / "tiny", progress=False)


def with_config(saved, tmp_path, **changes):
    """A copy of the checkpoint whose config.json says otherwise."""
    path = tmp_path / "edited"
    shutil.copytree(saved, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("field, match", [
    # used to run for 237 s, grow 7 GB, then raise SystemError
    ("num_hidden_layers", r"num_hidden_layers is 1000000, but the checkpoint's tensors name 2 layers"),
    # used to build a million experts per layer on the meta device, then list ~3 million missing tensors
    ("n_routed_experts", r"n_routed_experts 1000000 and hidden_size 32 disagree .*mlp\.gate\.weight has shape \[\d+, 32\]"),
])
def test_a_million_of_anything_in_config_json_is_refused_at_once_naming_what_the_checkpoint_has(saved, tmp_path, field, match):
    path = with_config(saved, tmp_path, **{field: 10**6})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path, progress=False)
    assert time.perf_counter() - t0 < 10


def test_a_hidden_size_the_embedding_does_not_have_is_refused_before_allocating(saved, tmp_path):
    """Used to attempt a 1 TB allocation although the shards hold 2 layers of width 32."""
    path = with_config(saved, tmp_path, hidden_size=10**9)
    with pytest.raises(CheckpointError, match=r"hidden_size 1000000000 disagree .* model\.embed_tokens\.weight has shape \[260, 32\]"):
        load_pretrained(path, progress=False)


def test_a_model_larger_than_the_memory_left_is_refused_by_name(saved, monkeypatch):
    import k2mini.checkpoint.load as load_module

    monkeypatch.setattr(load_module, "available_memory", lambda device: 100_000)
    with pytest.raises(MemoryError, match=r"num_hidden_layers=2, hidden_size=32.*parameters.*float32: more than the"):
        load_pretrained(saved, progress=False)
    monkeypatch.setattr(load_module, "available_memory", lambda device: 10**9)
    load_pretrained(saved, progress=False)  # the same checkpoint, with room for it


# ---------------------------------------------------------------------------------------------- sweeps

SWEEP = """
import glob, os, signal, sys, time
import k2mini.lab.experiments as ex

CORPUS, CACHE = os.environ["FAULTS_CORPUS"], os.environ["FAULTS_CACHE"]
real_run_one = ex.run_one

def run_one(spec, data=None, **kwargs):  # in the workers too: they import this script
    if spec.seed == 1:  # dies (as if killed for memory) once the other run is cached
        end = time.time() + 60
        while not glob.glob(os.path.join(CACHE, "*.json")) and time.time() < end:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_run_one(spec, data, **kwargs)

ex.run_one = run_one

if __name__ == "__main__":
    specs = [ex.RunSpec(steps=2, batch_size=2, seq_len=16, eval_every=0, config=%r, corpus=CORPUS, seed=s, label=f"run{s}")
             for s in (0, 1)]
    try:
        ex.run_sweep(specs, cache=CACHE, jobs=2, progress=False)
    except RuntimeError as e:
        print("RuntimeError:", e)
""" % (TINY_CONFIG,)


def _sweep_env(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    return dict(child_env(), FAULTS_CORPUS=str(corpus), FAULTS_CACHE=str(tmp_path / "cache"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_sweep_whose_worker_is_killed_fails_clearly_and_keeps_the_finished_run(tmp_path):
    """Used to wait forever: the pool replaced the dead worker and its run never came back."""
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    done = subprocess.run([sys.executable, str(script)], env=_sweep_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert "RuntimeError: run_sweep: a worker process died" in done.stdout and "['run1']" in done.stdout, done
    cached = [json.loads(p.read_text())["label"] for p in (tmp_path / "cache").glob("*.json")]
    assert cached == ["run0"]


@pytest.mark.multiprocess
def test_a_parallel_sweep_started_from_a_script_read_on_stdin_fails_clearly(tmp_path):
    """Used to start workers without end (each failed to import '<stdin>'); stopped after 6 minutes."""
    done = subprocess.run([sys.executable, "-"], input=SWEEP, env=_sweep_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert "RuntimeError: run_sweep(jobs=2): worker processes start by importing the main script, and '<stdin>'" \
        in done.stdout, done


@pytest.mark.multiprocess
def test_a_parallel_sweep_in_a_script_without_a_main_guard_says_so(tmp_path):
    """Each spawned worker imports the script and so starts the sweep again: said by name, not as a death."""
    script = tmp_path / "unguarded.py"
    script.write_text(SWEEP.replace("if __name__ == \"__main__\":", "if True:"))
    done = subprocess.run([sys.executable, str(script)], env=_sweep_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert 'must start it under `if __name__ == "__main__":`' in done.stdout + done.stderr, done  # from a worker
    assert "RuntimeError: run_sweep: a worker process died" in done.stdout and "failed to import the main script" \
        in done.stdout, done


# ---------------------------------------------------------------------------------------------- generate


def test_sampling_arguments_without_do_sample_are_named_in_a_warning():
    model = tiny_model().eval()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match=r"temperature=0\.7, top_p=0\.9 only apply when sampling.*do_sample=True"):
        out = model.generate(ids, 2, temperature=0.7, top_p=0.9)
    assert torch.equal(out, model.generate(ids, 2))  # greedy, as the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, 2, do_sample=True, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))


def test_generating_past_max_position_embeddings_warns():
    model = tiny_model().eval()
    limit = model.config.max_position_embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(torch.zeros(1, limit - 2, dtype=torch.long), 2)  # exactly up to the limit
    with pytest.warns(UserWarning, match=rf"{limit - 2} prompt \+ 3 new tokens go past max_position_embeddings \({limit}\)"):
        model.generate(torch.zeros(1, limit - 2, dtype=torch.long), 3)
