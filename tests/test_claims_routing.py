"""Notebook 02's claims: each is False on its negative control (the phenomenon absent) and True on a
positive one. Tables are hand-made where the claim's logic is the point; the router controls use real
models (an untrained router, hidden states permuted across tokens)."""

import pandas as pd
import pytest
import torch

from k2mini.lab.claims.routing import (
    bias_does_the_balancing,
    collapse_beyond_untrained,
    more_balanced_every_seed,
    no_loss_penalty_visible,
    routing_rebuilt_from_hidden_states,
    slow_bias_like_no_balancing,
    speed_sweep_optimum,
)
from k2mini.lab.experiments import RunSpec, build_model
from k2mini.lab.routing_study import bias_effect, rebuild_choice, router_inputs, routing_stats

# whole-run MaxVio of three seeds, shaped like notebook 02's ci table
MAXVIO = {"none": [5.46, 5.60, 4.91], "aux_loss": [1.71, 1.93, 2.17], "loss_free": [1.36, 1.49, 1.40],
          "loss_free+seq_aux": [1.20, 1.52, 1.52]}
VAL = {"none": [2.314, 2.343, 2.370], "aux_loss": [2.317, 2.349, 2.376], "loss_free": [2.331, 2.336, 2.374]}


def table(values: dict[str, list[float]], metric: str = "maxvio_all") -> pd.DataFrame:
    return pd.DataFrame([{"balancing": m, "seed": s, metric: v} for m, vs in values.items() for s, v in enumerate(vs)])


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = build_model(RunSpec(preset="k2-micro", config={"num_hidden_layers": 3}, seed=3)).eval()  # 2 MoE layers
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, ids


# ---------------------------------------------------------------------------------------- balance


def test_claim_loss_free_more_balanced_than_aux_positive():
    v = more_balanced_every_seed(table(MAXVIO), "loss_free", "aux_loss")
    assert v and v.margin > 0 and "per-seed gaps" in v.detail
    assert more_balanced_every_seed(table(MAXVIO), ["loss_free", "loss_free+seq_aux"], "aux_loss")


def test_claim_loss_free_more_balanced_than_aux_fails_swapped_identical_or_unbalanced():
    t = table(MAXVIO)
    assert not more_balanced_every_seed(t, "aux_loss", "loss_free")  # arms swapped
    same = table({"aux_loss": MAXVIO["aux_loss"], "loss_free": MAXVIO["aux_loss"]})
    assert not more_balanced_every_seed(same, "loss_free", "aux_loss")  # arms identical: gap 0
    assert not more_balanced_every_seed(t, "none", "aux_loss")  # no balancing as the arm
    # lower in every seed, but by less than the seed noise: not a result
    close = table({"aux_loss": MAXVIO["aux_loss"], "loss_free": [x - 0.05 for x in MAXVIO["aux_loss"]]})
    assert not more_balanced_every_seed(close, "loss_free", "aux_loss")
    # one seed the other way round
    flip = table({"aux_loss": [1.7, 1.9, 2.2], "loss_free": [1.0, 1.1, 2.3]})
    assert not more_balanced_every_seed(flip, "loss_free", "aux_loss")


def test_claim_balanced_methods_beat_none_every_seed():
    t = table(MAXVIO, "maxvio")
    assert more_balanced_every_seed(t, ["aux_loss", "loss_free", "loss_free+seq_aux"], "none", "maxvio")
    assert not more_balanced_every_seed(t, ["none"], "aux_loss", "maxvio")  # swapped


def test_more_balanced_needs_two_seeds_and_the_arms():
    with pytest.raises(ValueError, match="2 seeds"):
        more_balanced_every_seed(table({"a": [1.0], "b": [2.0]}), "a", "b")
    with pytest.raises(ValueError, match="no runs"):
        more_balanced_every_seed(table(MAXVIO), "muon", "aux_loss")


def test_claim_speed_sweep_optimum():
    sweep = {1e-3: 4.66, 3e-3: 2.52, 1e-2: 1.36, 3e-2: 1.77, 1e-1: 3.51}
    assert speed_sweep_optimum(sweep, 1e-2)
    assert not speed_sweep_optimum({u: 1.4 for u in sweep}, 1e-2)  # the speed does not matter: flat
    assert not speed_sweep_optimum({u: 5.46 for u in sweep}, 1e-2)  # no balancing at every speed
    assert not speed_sweep_optimum({**sweep, 1e-1: 2.0}, 1e-2)  # a fast end only 1.5x as imbalanced
    assert not speed_sweep_optimum(sweep, 3e-3)  # another speed is lowest


def test_claim_slow_bias_like_no_balancing():
    assert slow_bias_like_no_balancing(slow=6.41, none=6.68, best=0.54)
    assert not slow_bias_like_no_balancing(slow=0.54, none=6.68, best=6.41)  # arms swapped
    assert not slow_bias_like_no_balancing(slow=0.6, none=6.68, best=0.54)  # a slow bias that balanced


def test_claim_collapse_beyond_untrained(micro):
    untrained = pd.DataFrame({"maxvio": [1.9, 2.1, 2.0], "dead": [0.0, 0.0, 0.0]})
    trained = pd.DataFrame({"maxvio": [5.4, 5.7, 5.1], "dead": [0.19, 0.28, 0.12]})
    assert collapse_beyond_untrained(trained, untrained)
    assert not collapse_beyond_untrained(untrained, untrained)  # the untrained router in place of the trained
    balanced = pd.DataFrame({"maxvio": [0.5, 0.6, 0.6], "dead": [0.0, 0.0, 0.0]})
    assert not collapse_beyond_untrained(balanced, untrained)  # a balanced run
    # as concentrated, but no expert starved to death: not all of the claim
    assert not collapse_beyond_untrained(trained.assign(dead=0.0), untrained)
    # real untrained routers (two seeds) against themselves
    model, ids = micro
    rows = [routing_stats(build_model(RunSpec(preset="k2-micro", seed=s)).eval(), [ids]) for s in (0, 1)]
    real = pd.DataFrame({"maxvio": [r["maxvio"].mean() for r in rows], "dead": [r["dead"].mean() for r in rows]})
    assert not collapse_beyond_untrained(real, real)


def test_claim_no_loss_penalty_visible():
    assert no_loss_penalty_visible(table(VAL, "val_loss"))
    spread = max(VAL["aux_loss"]) - min(VAL["aux_loss"])
    penalty = {**VAL, "loss_free": [x + spread for x in VAL["aux_loss"]]}  # a real penalty, as large as the noise
    assert not no_loss_penalty_visible(table(penalty, "val_loss"))


# ---------------------------------------------------------------------------------------- router


def test_claim_bias_does_the_balancing_fails_on_an_untrained_router(micro):
    model, ids = micro
    effect = bias_effect(model, [ids])  # bias zero: no token redirected, raw routing = routed
    assert (effect["changed"] == 0).all() and (effect["maxvio_raw"] == effect["maxvio_routed"]).all()
    assert not bias_does_the_balancing(effect)
    positive = pd.DataFrame({"changed": [0.75, 0.93], "maxvio_raw": [2.8, 5.9], "maxvio_routed": [0.38, 0.43]})
    assert bias_does_the_balancing(positive)
    assert not bias_does_the_balancing(positive.assign(changed=[0.3, 0.93]))  # redirects too few
    assert not bias_does_the_balancing(positive.assign(maxvio_routed=[2.5, 5.0]))  # hardly better balanced


def test_claim_routing_rebuilt_from_hidden_states(micro):
    model, ids = micro
    gate = model.moe_layers()[0].mlp.gate
    gate.e_score_correction_bias.copy_(torch.linspace(-0.03, 0.03, gate.weight.shape[0]))  # let the bias matter
    try:
        hidden, records = router_inputs(model, ids)
        recorded = records[0].indices.reshape(-1, gate.top_k)
        assert routing_rebuilt_from_hidden_states(rebuild_choice(hidden[0], gate), recorded)
        perm = torch.randperm(len(hidden[0]), generator=torch.Generator().manual_seed(1))
        control = routing_rebuilt_from_hidden_states(rebuild_choice(hidden[0][perm], gate), recorded)
        assert not control and control.margin < -0.5  # permuted tokens: the choices mostly disagree
        other = model.moe_layers()[1].mlp.gate  # another layer's router on the same hidden states
        assert not routing_rebuilt_from_hidden_states(rebuild_choice(hidden[0], other), recorded)
    finally:
        gate.e_score_correction_bias.zero_()


def test_claim_balancing_verdicts_on_one_study():
    """All of notebook 02's claims on one (hand-made) study; swapping the two arms fails the key claim."""
    from k2mini.lab.claims.routing import balancing_verdicts

    speeds = {1e-3: (4.66, 6.41), 3e-3: (2.52, 0.54), 1e-2: (1.36, 0.54), 3e-2: (1.77, 1.05), 1e-1: (3.51, 3.20)}
    sweep = pd.DataFrame([{"balancing": "none", "bias_update_speed": 0.0, "maxvio_all": 5.46, "maxvio_max_layer": 6.68}]
                         + [{"balancing": "loss_free", "bias_update_speed": u, "maxvio_all": a, "maxvio_max_layer": w}
                            for u, (a, w) in speeds.items()])  # fmt: skip
    end = {"none": [5.46, 5.71, 5.11], "aux_loss": [0.90, 0.83, 1.11], "loss_free": [0.47, 0.64, 0.64],
           "loss_free+seq_aux": [0.55, 0.62, 0.56]}
    t = table(MAXVIO).merge(table(end, "maxvio")).merge(table(VAL, "val_loss"), how="left")
    t["dead"] = [0.19 if m == "none" else 0.0 for m in t["balancing"]]
    untrained = pd.DataFrame({"maxvio": [1.9, 2.1, 2.0], "dead": [0.0, 0.0, 0.0]})
    effect = pd.DataFrame({"changed": [0.75, 0.93], "maxvio_raw": [2.8, 5.9], "maxvio_routed": [0.38, 0.43]})
    verdicts = balancing_verdicts(sweep, t, untrained, effect, 1e-2)
    assert all(verdicts.values()), {k: v.explain() for k, v in verdicts.items()}
    swapped = t.assign(balancing=t["balancing"].replace({"loss_free": "aux_loss", "aux_loss": "loss_free"}))
    assert not balancing_verdicts(sweep, swapped, untrained, effect, 1e-2)["loss_free"]


def test_untrained_window_is_the_runs_first_routing(tmp_path):
    """The control's statistic is the run's own: on a run's first step the model is still the untrained
    one, so the untrained router on that step's batch has the MaxVio the run logged at step 0."""
    import k2mini
    from k2mini.lab.experiments import run_sweep
    from k2mini.lab.routing_study import untrained_window_stats

    path = tmp_path / "text.txt"
    path.write_text("To be, or not to be, that is the question:\n" * 200)
    data = k2mini.make_dataset(k2mini.load_corpus(str(path)), val_fraction=0.1, block_size=256)
    spec = RunSpec(preset="k2-micro", lr=3e-3, steps=2, batch_size=4, seq_len=16, eval_every=2, eval_batches=1, seed=5)
    run = run_sweep([spec], cache=False, data=data, progress=False)[0]
    first = untrained_window_stats(spec.replace(steps=1), data, last=1)
    assert first["maxvio"] == pytest.approx(run.history["maxvio"].iloc[0], abs=1e-6)
    assert first["dead"] == pytest.approx((run.loads[0] == 0).mean())


def test_study_specs_share_runs_between_sweep_and_methods():
    from k2mini.lab.balancing_record import SPEEDS, study_specs

    sweep, methods = study_specs(200, [0, 1, 2], 1e-2)
    assert len(sweep) == 1 + len(SPEEDS) and len(methods) == 12
    keys = {s.key() for s in methods}
    assert sweep[0].key() in keys and sweep[1 + SPEEDS.index(1e-2)].key() in keys  # trained once, used twice
    assert len({s.key() for s in sweep + methods}) == 16
