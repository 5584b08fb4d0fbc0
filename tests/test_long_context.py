"""k2mini.lab.long_context: rope arms, planted keys, measurements, and the claims' controls."""

import numpy as np
import pytest
import torch

import k2mini
from k2mini import K2Config, K2ForCausalLM
from k2mini.lab import long_context as lc
from k2mini.lab.claims import registry
from k2mini.lab.claims.long_context import yarn_beats_plain_after_continued, yarn_reads_long
from lab_runs import write_corpus

T0 = lc.TRAINED_LEN


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = write_corpus(tmp_path_factory)
    return k2mini.make_dataset(k2mini.load_corpus(str(path)), val_fraction=0.5, block_size=1024)


def micro(seed=0, **changes):
    torch.manual_seed(seed)
    config = K2Config.preset("k2-micro").replace(rope_theta=lc.mini_rope_theta(), max_position_embeddings=T0, **changes)
    return K2ForCausalLM(config).eval()


def test_rope_overrides_are_the_library_types():
    for method in lc.METHODS + ("yarn_no_mscale",):
        c = K2Config.preset("k2-micro").replace(**lc.rope_overrides(method, T0, 8 * T0))
        assert (c.rope_scaling or {}).get("rope_type", "default") == {"plain": "default", "yarn_no_mscale": "yarn"}.get(
            method, method)
        if c.rope_scaling:
            assert c.rope_scaling["factor"] == 8.0
    assert lc.rope_overrides("dynamic", T0, 512)["max_position_embeddings"] == T0
    assert lc.mini_rope_theta(4096) == 50000.0
    with pytest.raises(ValueError, match="method"):
        lc.rope_overrides("alibi", T0, 512)


def test_with_rope_keeps_weights_and_only_moves_positions():
    m = micro()
    ids = torch.randint(0, 256, (1, T0), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = m(ids).logits
        dynamic = lc.with_rope(m, "dynamic", T0, 8 * T0)(ids).logits  # at <= T0 tokens: the base frequencies
        linear = lc.with_rope(m, "linear", T0, 8 * T0)(ids).logits
    assert torch.equal(plain, dynamic)
    assert (plain - linear).abs().max() > 1e-4
    # position 0 is not rotated by any scheme, and yarn's mscale only scales logits: the first token agrees
    assert torch.allclose(plain[:, 0], linear[:, 0], atol=1e-6)


def test_planted_keys_appear_twice_and_batches_stay_shifted(data):
    planted = lc.PlantedKeys(data, fraction=1.0)
    x, y = planted.batch_for_step("train", 3, 4, 48, seed=0)
    x2, _ = planted.batch_for_step("train", 3, 4, 48, seed=0)
    assert torch.equal(x, x2)  # deterministic in (seed, step)
    assert torch.equal(x[:, 1:], y[:, :-1])
    plain, _ = data.batch_for_step("train", 3, 4, 48, seed=0)
    changed = (x != plain).sum(1)
    assert (changed > 0).all() and (changed <= 2 * lc.KEY_LEN).all()
    vx, _ = next(planted.iter_val_batches(2, 48, max_batches=1))
    assert torch.equal(vx, next(data.iter_val_batches(2, 48, max_batches=1))[0])  # validation is plain text
    none, _ = lc.PlantedKeys(data, fraction=0.0).batch_for_step("train", 3, 4, 48, seed=0)
    assert torch.equal(none, plain)


def test_retrieval_batch_asks_for_the_key_at_its_distance(data):
    x, y, where = lc.retrieval_batch(data, 128, 40, 3)
    b = 4 + lc.KEY_LEN + 40
    assert torch.equal(x[:, 4 : 4 + lc.KEY_LEN], x[:, b : b + lc.KEY_LEN])
    assert torch.equal(y[:, where], x[:, b + 1 : b + lc.KEY_LEN])
    with pytest.raises(ValueError, match="does not fit"):
        lc.retrieval_batch(data, 64, 60, 1)


def test_attention_by_position_agrees_with_the_model_telemetry():
    for method in ("plain", "yarn", "dynamic"):
        m = lc.with_rope(micro(1), method, T0, 4 * T0)
        ids = torch.randint(0, 256, (2, 4 * T0), generator=torch.Generator().manual_seed(1))
        stats = lc.attention_by_position(m, ids)
        with torch.no_grad():
            tel = m(ids, telemetry=True).telemetry.max_logits  # (layers, heads)
        assert torch.allclose(stats["max_logit"].amax(1), tel.amax(1), atol=1e-5)
        assert torch.allclose(stats["entropy"][:, 0], torch.zeros(2), atol=1e-6)  # one key: no uncertainty
        assert (stats["entropy"][:, 1:] > 0).all()


def test_yarn_mscale_scales_every_logit_by_its_square():
    """An identity shown in the notebook: same frequencies, logits times mscale^2 = (0.1 ln s + 1)^2."""
    m = micro(2)
    ids = torch.randint(0, 256, (1, 8 * T0), generator=torch.Generator().manual_seed(2))
    with_m = lc.attention_by_position(lc.with_rope(m, "yarn", T0, 8 * T0), ids)["max_logit"]
    without = lc.attention_by_position(lc.with_rope(m, "yarn_no_mscale", T0, 8 * T0), ids)["max_logit"]
    # layer 0 sees the same inputs in both; later layers see different hidden states
    assert torch.allclose(with_m[0], without[0] * (0.1 * np.log(8) + 1) ** 2, rtol=1e-5)


def test_loss_by_position_and_buckets(data):
    m = micro()
    loss = lc.loss_by_position(m, data, 128, n=2)
    assert loss.shape == (128,)
    assert abs(float(loss.mean()) - np.log(260)) < 0.5  # an untrained model: about uniform over the bytes
    assert np.allclose(lc.bucketed(torch.arange(8.0), 4), [1.5, 5.5])


def test_study_runs_end_to_end_at_a_tiny_scale(data, tmp_path, monkeypatch):
    monkeypatch.setenv("K2MINI_RUN_CACHE", str(tmp_path))
    scale = lc.StudyScale(seeds=(0,), base_steps=2, base_batch=2, long_factor=2, continue_steps=1, eval_windows=1,
                          retrieval_windows=2)
    out = lc.run_study(scale, data, progress=False, distances=(8, 80))
    assert set(out["loss"]) == {(0, m, st, 2 * T0) for m in lc.METHODS for st in ("as trained", "continued")}
    assert all(v.shape == (2 * T0,) for v in out["loss"].values())
    assert all(v.shape == (2,) for v in out["retrieval"].values())
    again = lc.run_study(scale, data, progress=False, distances=(8, 80))  # from the cache: the same numbers
    assert all(np.array_equal(out["loss"][k], again["loss"][k]) for k in out["loss"])
    assert any((tmp_path / "long_context").glob("continued-*.pt"))


# ---------------------------------------------------------------------------------------------- claims

def _losses(short_level, long_level, seeds=(0, 1, 2), n=8 * T0):
    short = {s: np.full(n, short_level) for s in seeds}
    long = {s: np.r_[np.full(T0, short_level), np.full(n - T0, long_level + 0.01 * s)] for s in seeds}
    return short, long


def test_claim_yarn_reads_long_positive_control():
    short, yarn = _losses(2.3, 2.35)
    _, plain = _losses(2.3, 3.1)
    v = yarn_reads_long(yarn, plain, short, margin=0.3)
    assert v.holds and 0.2 < v.margin < 0.3 and "plain" in v.detail


def test_claim_yarn_reads_long_negative_controls():
    short, plain = _losses(2.3, 3.1)
    assert not yarn_reads_long(plain, plain, short, margin=0.3)  # the two arms made identical
    _, untrained = _losses(2.3, np.log(260))  # flat loss: no position effect, but nothing read either
    assert not yarn_reads_long(untrained, plain, short, margin=0.3)
    _, yarn = _losses(2.3, 2.35)
    assert not yarn_reads_long(plain, yarn, short, margin=0.3)  # arms swapped
    with pytest.raises(ValueError, match="same seeds"):
        yarn_reads_long(yarn, {0: plain[0]}, short, margin=0.3)


def test_claim_yarn_beats_plain_after_continued_controls():
    short, a = _losses(2.3, 2.4)
    _, b = _losses(2.3, 2.55)
    assert yarn_beats_plain_after_continued(a, b, short, margin=0.05)  # positive control
    assert not yarn_beats_plain_after_continued(a, a, short, margin=0.05)  # identical arms
    assert not yarn_beats_plain_after_continued(b, a, short, margin=0.05)  # swapped
    b[1] = a[1]  # one seed without the gap
    assert not yarn_beats_plain_after_continued(a, b, short, margin=0.05)


def test_claims_are_registered_for_notebook_07():
    names = {c.name for c in registry() if c.notebook == "07"}
    assert names == {"yarn_reads_long", "yarn_beats_plain_after_continued"}
