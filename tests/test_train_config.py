"""TrainConfig refuses bad settings by name, through k2mini.checks: a bool is not a count, a count is an int,
rates are finite and in range. Every refusal is a ValueError (the wrong type also a TypeError)."""

import pytest

from k2mini.training import TrainConfig


@pytest.mark.parametrize("bad, says", [
    (dict(steps=True), "steps must be an int, got bool True"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(seq_len=16.0), "seq_len must be an int, got float"),
    (dict(eval_every=-1), "eval_every must be >= 0"),
    (dict(checkpoint_every=0), "checkpoint_every must be >= 1"),
    (dict(aux_alpha=float("nan")), "aux_alpha must be finite"),
    (dict(bias_update_speed=-1e-3), "bias_update_speed must be >= 0"),
    (dict(min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(grad_clip=0.0), "grad_clip must be > 0"),
    (dict(grad_clip="1"), "grad_clip must be a real number"),
])
def test_bad_settings_are_refused_by_name(bad, says):
    with pytest.raises(ValueError, match=f"TrainConfig: {says}"):
        TrainConfig(**{"steps": 1, **bad})


def test_the_edges_of_the_ranges_are_allowed():
    cfg = TrainConfig(steps=0, eval_every=0, min_lr_ratio=1, aux_alpha=0, grad_clip=None, checkpoint_every=1)
    assert cfg.grad_clip is None and not cfg.evaluates_at(0)
