"""Training loop: determinism, resume, balancing in the loop, non-finite handling, 2-process DDP."""

import dataclasses
import os

import pytest
import torch

import k2mini
from k2mini import K2Config, K2ForCausalLM
from k2mini.optim import TakesMaxLogits, build_optimizer
from k2mini.training import NonFiniteLossError, TrainConfig, lr_factor, train

TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return k2mini.make_dataset(k2mini.load_corpus(str(path)), val_fraction=0.1, block_size=256)


def fresh(seed=0):
    torch.manual_seed(seed)
    return K2ForCausalLM(K2Config.preset("k2-micro"))


def adamw(model, lr=3e-3):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


SETTINGS = dict(batch_size=4, seq_len=32, eval_every=5, eval_batches=2, progress=False)


def test_history_columns_and_learning(data):
    m = fresh()
    h = train(m, data, adamw(m), 12, **SETTINGS)
    assert len(h) == 12
    for col in ("train_loss", "val_loss", "lr", "grad_norm", "max_logit", "max_logit_l0", "maxvio", "maxvio_l1",
                "load", "heads_clipped", "tokens", "wall_time"):
        assert col in h, col
    assert h["load"].iloc[0].shape == (1, 16) and h["load"].iloc[0].sum() == 4 * 32 * 2
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert h["val_loss"].notna().sum() == 3  # steps 5, 10 and the last
    assert h.attrs["stop_reason"] == "completed"


def test_runs_are_deterministic(data):
    a = train((m := fresh()), data, adamw(m), 6, **SETTINGS)
    b = train((m := fresh()), data, adamw(m), 6, **SETTINGS)
    assert a["train_loss"].tolist() == b["train_loss"].tolist()


def test_training_inside_autocast_sees_every_steps_weights(data):
    """`with torch.autocast("cpu", dtype=torch.bfloat16): train(...)` runs every step in one autocast region,
    whose cast cache would keep the bf16 copies of the first step's weights for the whole run (the loss then
    barely falls). train() clears it after each optimizer step: the run equals one without the cache."""
    runs = {}
    for cache in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            runs[cache] = train((m := fresh()), data, adamw(m, lr=1e-2), 8, **SETTINGS)["train_loss"].tolist()
    assert runs[True] == runs[False]
    float32 = train((m := fresh()), data, adamw(m, lr=1e-2), 8, **SETTINGS)["train_loss"].tolist()
    assert runs[True][-1] < runs[True][0] - 0.5  # it learns, as the float32 run does
    assert abs(runs[True][-1] - float32[-1]) < 0.1, (runs[True], float32)


def test_resume_equals_uninterrupted(data, tmp_path):
    full = train((m := fresh()), data, adamw(m), 10, checkpoint_every=2, checkpoint_dir=tmp_path / "a", **SETTINGS)
    # interrupted during step 5: the last checkpoint is the one after step 3
    with pytest.raises(_Interrupt):
        train((m := fresh()), data, adamw(m), 10, checkpoint_every=2, checkpoint_dir=tmp_path / "b",
              callback=_interrupt_at(5), **SETTINGS)
    m2 = fresh(seed=123)  # a different init: everything must come from the checkpoint
    resumed = train(m2, data, adamw(m2), 10, checkpoint_every=2, checkpoint_dir=tmp_path / "b", resume=True, **SETTINGS)
    assert resumed["step"].tolist() == list(range(10))
    assert resumed["train_loss"].tolist() == full["train_loss"].tolist()
    assert resumed["val_loss"].dropna().tolist() == full["val_loss"].dropna().tolist()
    assert torch.equal(m2.lm_head.weight, _final_weights(tmp_path / "a"))


def _final_weights(ckpt_dir):
    return torch.load(ckpt_dir / "last.pt", weights_only=True)["model"]["lm_head.weight"]


class _Interrupt(Exception):
    pass


def _interrupt_at(step):
    def cb(s, row):
        if s == step:
            raise _Interrupt
    return cb


def test_interrupt_keeps_last_checkpoint(data, tmp_path):
    with pytest.raises(_Interrupt):
        train((m := fresh()), data, adamw(m), 10, checkpoint_every=2, checkpoint_dir=tmp_path, callback=_interrupt_at(4), **SETTINGS)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.parametrize("method", ["none", "aux_loss", "loss_free", "loss_free+seq_aux"])
def test_balancing_methods_in_the_loop(data, method):
    m = fresh()
    h = train(m, data, adamw(m), 3, balancing=method, bias_update_speed=0.01, **SETTINGS)
    bias = m.moe_layers()[0].mlp.gate.e_score_correction_bias
    if method.startswith("loss_free"):
        # three updates of +-u (or 0) each: every bias is a multiple of u within [-3u, 3u]
        assert bias.abs().max() > 0 and bias.abs().max() <= 0.03 + 1e-7
        assert torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-4)
    else:
        assert torch.equal(bias, torch.zeros_like(bias))
    if method in ("aux_loss", "loss_free+seq_aux"):
        assert (h["aux_loss"] > 0).all()
    else:
        assert (h["aux_loss"] == 0).all()


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, cfg) == pytest.approx(0.55)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    m = fresh()
    opt = adamw(m)

    def poison(step, row):  # after step 2, between checkpoints (non-finite weights are never saved)
        if step == 2:
            with torch.no_grad():
                m.lm_head.weight.fill_(float("nan"))

    with pytest.warns(RuntimeWarning, match=r"training loss became nan at step 3.*last good checkpoint is .*last\.pt"):
        h = train(m, data, opt, 10, checkpoint_every=2, checkpoint_dir=tmp_path, callback=poison, **SETTINGS)
    assert h.attrs["diverged"] and h.attrs["stop_reason"] == "non-finite loss at step 3"
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1
    m2 = fresh()
    with pytest.raises(NonFiniteLossError, match="step 4"):
        train(m2, data, adamw(m2), 10, callback=lambda s, r: s == 3 and m2.lm_head.weight.data.fill_(float("inf")),
              on_nonfinite="raise", **SETTINGS)


def test_bad_settings():
    with pytest.raises(ValueError, match="balancing"):
        TrainConfig(steps=1, balancing="magic")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(steps=1, schedule="linear")


def test_optimizers_that_take_max_logits_get_them(data):
    seen = []

    class Recording(torch.optim.AdamW, TakesMaxLogits):
        def step(self, closure=None, *, max_logits=None):
            seen.append(max_logits)
            return super().step(closure)

    m = fresh()
    train(m, data, Recording(m.parameters(), lr=1e-3), 2, **SETTINGS)
    c = m.config
    assert len(seen) == 2 and all(t.shape == (c.num_hidden_layers, c.num_attention_heads) for t in seen)
    assert all(isinstance(build_optimizer(m, kind, lr=1e-3), TakesMaxLogits) for kind in ("muonclip", "muon", "adamw"))
    assert not isinstance(adamw(m), TakesMaxLogits)  # gets a plain step()


def test_the_module_is_not_shadowed_by_the_function():
    import inspect

    import k2mini.training

    assert inspect.ismodule(k2mini.training) and k2mini.train is k2mini.training.train
    assert "extra" not in {f.name for f in dataclasses.fields(TrainConfig)}
