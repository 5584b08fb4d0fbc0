"""Training checkpoints that lose nothing and divergence that behaves the same for every optimizer:
last.pt + prev.pt, only finite states saved, the really-last-good file named, another run's directory
refused, damage detected by checksum, resumes with other settings refused by name."""

import os

import pytest
import torch

import k2mini
from k2mini import K2Config, K2ForCausalLM
from k2mini.optim import build_optimizer
from k2mini.run.resume_state import CheckpointDamagedError
from k2mini.training import NonFiniteLossError, train

TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3
SETTINGS = dict(batch_size=4, seq_len=32, eval_every=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return k2mini.make_dataset(k2mini.load_corpus(str(path)), val_fraction=0.1, block_size=256)


def fresh(seed=0, **changes):
    torch.manual_seed(seed)
    return K2ForCausalLM(K2Config.preset("k2-micro").replace(**changes))


def adamw(model, lr=3e-3):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def load(path):
    return torch.load(path, weights_only=True)


def _at(step, action):
    def cb(s, row):
        if s == step:
            with torch.no_grad():
                action()
    return cb


# ---------------------------------------------------------------------------------------------- rotation


def test_blown_up_but_finite_weights_do_not_replace_the_last_good_checkpoint(data, tmp_path):
    m = fresh()
    # after step 3 the head blows up (still finite, so it is saved); step 4's gradient is then not finite
    blow_up = _at(3, lambda: m.lm_head.weight.mul_(1e36))
    with pytest.warns(RuntimeWarning, match=r"at step 4.*last good checkpoint is .*last\.pt \(it was prev\.pt.*diverged"):
        h = train(m, data, adamw(m), 10, checkpoint_every=2, checkpoint_dir=tmp_path, callback=blow_up, **SETTINGS)
    assert h.attrs["stop_reason"] == "non-finite gradient or max logit at step 4"
    # the blown-up weights are set aside, the good ones are what resume=True continues from
    assert sorted(os.listdir(tmp_path)) == ["diverged-step3.pt", "last.pt"]  # no temporary files left
    assert load(tmp_path / "diverged-step3.pt")["step"] == 3 and load(tmp_path / "last.pt")["step"] == 1
    assert load(tmp_path / "last.pt")["model"]["lm_head.weight"].abs().max() < 1
    m2 = fresh(7)
    h = train(m2, data, adamw(m2), 3, checkpoint_every=2, checkpoint_dir=tmp_path, resume=True, **SETTINGS)
    assert h["step"].tolist() == [0, 1, 2] and h.attrs["stop_reason"] == "completed"
    assert load(tmp_path / "prev.pt")["step"] == 1  # the good state is still there after the next save


def test_non_finite_weights_are_never_saved(data, tmp_path):
    m = fresh()
    poison = _at(3, lambda: m.model.norm.weight.fill_(float("nan")))
    with pytest.warns(RuntimeWarning, match=r"model\.norm\.weight holds inf or nan.*last good checkpoint is .*last\.pt"):
        h = train(m, data, adamw(m), 10, checkpoint_every=2, checkpoint_dir=tmp_path, callback=poison, **SETTINGS)
    assert h.attrs["diverged"] and h.attrs["stop_reason"] == "non-finite weights after step 3"
    assert load(tmp_path / "last.pt")["step"] == 1 and not (tmp_path / "prev.pt").exists()
    m2 = fresh()
    poison = _at(1, lambda: m2.lm_head.weight.fill_(float("inf")))
    with pytest.raises(NonFiniteLossError, match=r"step 1.*lm_head\.weight.*No good checkpoint"):
        train(m2, data, adamw(m2), 4, checkpoint_every=2, checkpoint_dir=tmp_path / "b", callback=poison,
              on_nonfinite="raise", **SETTINGS)
    assert not (tmp_path / "b" / "last.pt").exists()
    # the final save checks too
    m3 = fresh()
    with pytest.warns(RuntimeWarning, match="after step 2"):
        h = train(m3, data, adamw(m3), 3, checkpoint_dir=tmp_path / "c",
                  callback=_at(2, lambda: m3.model.norm.weight.fill_(float("nan"))), **SETTINGS)
    assert h.attrs["stop_reason"] == "non-finite weights after step 2" and not (tmp_path / "c" / "last.pt").exists()


# ---------------------------------------------------------------------------------------------- another run


def test_a_new_run_refuses_a_directory_holding_another_runs_checkpoint(data, tmp_path):
    train((m := fresh()), data, adamw(m), 2, checkpoint_dir=tmp_path, **SETTINGS)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"last\.pt.*resume=True.*overwrite=True"):
        train((m := fresh(1)), data, adamw(m), 2, checkpoint_dir=tmp_path, **SETTINGS)
    assert (tmp_path / "last.pt").read_bytes() == before
    with pytest.raises(ValueError, match="not both"):
        train((m := fresh(1)), data, adamw(m), 2, checkpoint_dir=tmp_path, resume=True, overwrite=True, **SETTINGS)
    # overwrite=True replaces it, and the old run's checkpoint does not linger as prev.pt
    train((m := fresh(1)), data, adamw(m), 4, checkpoint_every=2, checkpoint_dir=tmp_path, **SETTINGS,
          overwrite=True)
    assert load(tmp_path / "last.pt")["step"] == 3 and load(tmp_path / "prev.pt")["step"] == 1
    train((m := fresh(1)), data, adamw(m), 1, checkpoint_dir=tmp_path, overwrite=True, **SETTINGS)
    assert load(tmp_path / "last.pt")["step"] == 0 and not (tmp_path / "prev.pt").exists()


# ---------------------------------------------------------------------------------------------- damage


def _flip_a_byte_of(path, tensor):
    raw = bytearray(path.read_bytes())
    at = raw.find(tensor.contiguous().numpy().tobytes())
    assert at > 0
    raw[at + tensor.numel() * tensor.element_size() // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_a_named_error_not_a_silent_resume(data, tmp_path):
    train((m := fresh()), data, adamw(m), 4, checkpoint_every=2, checkpoint_dir=tmp_path, **SETTINGS)
    state = load(tmp_path / "last.pt")
    _flip_a_byte_of(tmp_path / "last.pt", state["optimizer"]["state"][3]["exp_avg_sq"])
    with pytest.raises(CheckpointDamagedError, match=r"last\.pt: its contents do not match its checksum"):
        train((m := fresh()), data, adamw(m), 6, checkpoint_every=2, checkpoint_dir=tmp_path, resume=True, **SETTINGS)
    (tmp_path / "last.pt").write_bytes((tmp_path / "prev.pt").read_bytes()[:5000])  # truncated
    with pytest.raises(CheckpointDamagedError, match=r"last\.pt: not a readable training checkpoint"):
        train((m := fresh()), data, adamw(m), 6, checkpoint_dir=tmp_path, resume=True, **SETTINGS)
    torch.save({"model": {}, "optimizer": {}, "step": 1, "rows": []}, tmp_path / "last.pt")
    with pytest.raises(CheckpointDamagedError, match="no checksum"):
        train((m := fresh()), data, adamw(m), 6, checkpoint_dir=tmp_path, resume=True, **SETTINGS)


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(seed=1), r"seed: 0 -> 1"),
        (dict(balancing="aux_loss"), r"balancing: 'loss_free' -> 'aux_loss'"),
        (dict(lr=1e-3), r"optimizer group \d+ peak_lr: 0\.003 -> 0\.001"),
        (dict(kind="sgd"), r"optimizer: AdamW -> SGD"),
        (dict(config=dict(rms_norm_eps=1e-5)), r"model config rms_norm_eps: 1e-06 -> 1e-05"),
        (dict(config=dict(routed_scaling_factor=1.0)), r"model config routed_scaling_factor"),
    ],
)
def test_a_resume_with_other_settings_is_refused_by_name(data, tmp_path, change, named):
    train((m := fresh()), data, adamw(m), 2, checkpoint_dir=tmp_path, **SETTINGS)
    m = fresh(5, **change.get("config", {}))
    opt = torch.optim.SGD(m.parameters(), lr=3e-3) if change.get("kind") == "sgd" else adamw(m, change.get("lr", 3e-3))
    settings = {**SETTINGS, **{k: v for k, v in change.items() if k in ("seed", "balancing")}}
    before = m.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match=r"last\.pt: resuming with settings other than the checkpoint's: .*" + named):
        train(m, data, opt, 4, checkpoint_dir=tmp_path, resume=True, **settings)
    assert torch.equal(m.lm_head.weight, before)  # refused before anything loaded


def test_a_resume_may_run_longer_and_log_differently(data, tmp_path):
    train((m := fresh()), data, adamw(m), 2, checkpoint_dir=tmp_path, **SETTINGS)
    h = train((m := fresh()), data, adamw(m), 4, checkpoint_dir=tmp_path, resume=True,
              **{**SETTINGS, "eval_every": 2, "log_every": 2})
    assert h["step"].tolist() == [0, 1, 3] and h.attrs["stop_reason"] == "completed"
    # but not longer under a cosine schedule: its lr decays over `steps`
    train((m := fresh()), data, adamw(m), 2, checkpoint_dir=tmp_path / "cos", schedule="cosine", **SETTINGS)
    with pytest.raises(ValueError, match=r"steps: 2 -> 4"):
        train((m := fresh()), data, adamw(m), 4, checkpoint_dir=tmp_path / "cos", resume=True, schedule="cosine",
              **SETTINGS)


# ---------------------------------------------------------------------------------------------- divergence


def _nan_gradient_at(model, step):
    """From `step` on, the head's gradient is nan while the loss stays finite."""
    def cb(s, row):
        if s == step - 1:
            model.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    return cb


def _optimizer(kind, m):
    return adamw(m) if kind == "torch-adamw" else build_optimizer(m, kind, lr=3e-3)


@pytest.mark.parametrize("kind", ["muonclip", "muon", "adamw", "torch-adamw"])
@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_a_non_finite_gradient_stops_every_optimizer_the_documented_way(data, tmp_path, kind, grad_clip):
    m = fresh()
    opt = _optimizer(kind, m)
    with pytest.warns(RuntimeWarning, match=r"gradient norm became nan at step 2.*last good checkpoint is .*last\.pt \(it was prev"):
        h = train(m, data, opt, 6, checkpoint_every=1, checkpoint_dir=tmp_path, callback=_nan_gradient_at(m, 2),
                  grad_clip=grad_clip, **SETTINGS)
    assert h.attrs["diverged"] and h.attrs["stop_reason"] == "non-finite gradient or max logit at step 2"
    assert h["step"].tolist() == [0, 1, 2] and h["grad_norm"].isna().tolist() == [False, False, True]
    after_step_1 = load(tmp_path / "diverged-step1.pt")["model"]
    assert all(torch.equal(v, after_step_1[k]) for k, v in m.state_dict().items())  # step 2 changed nothing
    m = fresh()
    with pytest.raises(NonFiniteLossError, match=r"gradient norm became nan at step 3"):
        train(m, data, _optimizer(kind, m), 6, callback=_nan_gradient_at(m, 3), grad_clip=grad_clip,
              on_nonfinite="raise", **SETTINGS)


# ---------------------------------------------------------------------------------------------- settings' values


@pytest.mark.parametrize("field,value", [
    ("log_every", 0),  # was a ZeroDivisionError after the first step
    ("grad_clip", float("nan")),  # was nan gradients applied to every weight
    ("grad_clip", -1.0),  # was every gradient's sign flipped: training uphill
    ("grad_clip", 0.0),
    ("bias_update_speed", float("nan")),  # was nan correction biases: routing silently wrong
    ("bias_update_speed", -1e-3),
    ("eval_batches", 0),  # was a val_loss of exactly 0.0
    ("eval_every", -2), ("checkpoint_every", 0), ("checkpoint_every", -1),
    ("min_lr_ratio", 2.0), ("warmup_steps", -3), ("aux_alpha", float("inf")), ("seq_aux_alpha", -1.0),
    ("steps", True), ("batch_size", 2.5), ("seq_len", "32"), ("seed", -1),
])
def test_train_settings_are_checked_by_type_and_range_naming_the_field(field, value):
    from k2mini.training import TrainConfig

    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**{"steps": 3, field: value})
