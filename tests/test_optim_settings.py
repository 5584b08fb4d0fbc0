"""Muon's settings are one list (MuonSettings): Muon, MuonAdamW's Muon groups and build_optimizer take the
same names with the same defaults, and refuse a name that is not one of them."""

from dataclasses import fields

import pytest
import torch

from k2mini import K2Config, K2ForCausalLM
from k2mini.optim import Muon, MuonAdamW, build_optimizer
from k2mini.optim.muon import WEIGHT_DECAY, MuonSettings

NAMES = [f.name for f in fields(MuonSettings)]
CHANGED = dict(momentum=0.9, nesterov=False, ns_steps=3, adjust_lr="original", ns_dtype=torch.float32, eps=1e-6)


def micro():
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.preset("k2-micro"))


def muon_groups(make, **settings):
    """The Muon param groups of the optimizer make(**settings) builds."""
    opt = make(**settings)
    return [g for g in opt.param_groups if g.get("use_muon", True)], opt


MAKERS = {
    "Muon": lambda **kw: Muon([torch.nn.Parameter(torch.randn(4, 4))], lr=1e-2, **kw),
    "MuonAdamW": lambda **kw: MuonAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "use_muon": True},
                                         {"params": [torch.nn.Parameter(torch.randn(4))], "use_muon": False}],
                                        lr=1e-2, **kw),
    "build_optimizer": lambda **kw: build_optimizer(micro(), "muonclip", lr=1e-2, **kw),
}


@pytest.mark.parametrize("where", MAKERS)
def test_defaults_are_the_settings_defaults(where):
    groups, opt = muon_groups(MAKERS[where])
    assert groups and all({k: g[k] for k in NAMES} == MuonSettings().group_defaults() for g in groups)
    assert all(g["weight_decay"] == WEIGHT_DECAY for g in groups)
    for g in opt.param_groups:
        if not g.get("use_muon", True):  # AdamW groups keep AdamW's eps and get no Muon setting
            assert g["eps"] == 1e-8 and "ns_steps" not in g and "momentum" not in g


@pytest.mark.parametrize("where", MAKERS)
def test_every_setting_given_once_reaches_every_muon_group(where):
    assert set(CHANGED) == set(NAMES)  # every setting is exercised, none left at its default
    assert all(CHANGED[k] != v for k, v in MuonSettings().group_defaults().items())
    groups, _ = muon_groups(MAKERS[where], **CHANGED)
    assert groups and all({k: g[k] for k in NAMES} == CHANGED for g in groups)


@pytest.mark.parametrize("where", MAKERS)
def test_a_name_that_is_not_a_setting_is_refused_by_name(where):
    with pytest.raises(TypeError, match=r"'momentun'.*settings are momentum, nesterov, ns_steps"):
        MAKERS[where](momentun=0.9)
