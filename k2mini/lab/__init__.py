"""k2mini.lab: what the notebooks run and draw. The library (`k2mini`) never imports it.

Submodules load on first use: `experiments` (run specs, sweeps, the run cache, records),
`routing_study` (routing walkthrough, balancing and sparsity studies), `attention_costs` (KV-cache
and decode arithmetic), `plots` and `plots_stability` (figures; need the [lab] extra),
`pretrained` (`pretrained_mini`: small K2s trained once and cached).
"""

import importlib

_SUBMODULES = {"experiments", "routing_study", "attention_costs", "plots", "plots_stability", "pretrained"}


def pretrained_mini(*args, **kwargs):
    """`k2mini.lab.pretrained.pretrained_mini` (see there)."""
    from .pretrained import pretrained_mini as load

    return load(*args, **kwargs)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'k2mini.lab' has no attribute {name!r}")
