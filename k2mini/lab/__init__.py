"""k2mini.lab: what the notebooks run and draw. The library (`k2mini`) never imports it.

Submodules load on first use: `experiments` (the one experiment framework: RunSpec, run_sweep, the
run cache), `records` (committed records of full-scale runs), `stability` and `routing_study`
(summaries and verdicts of notebooks 04, and 02 / 05), `attention_costs` (KV-cache and decode
arithmetic), `palette`, `plots` and `plots_stability` (figures; need the [lab] extra), `seriation`
(clustered heatmap orderings, scipy), `pretrained` (`pretrained_mini`: small K2s trained once and
cached; also as K2-Thinking's INT4 and unquantized), `quantization_study` (what fp8 and INT4 storage do
to a trained model).
"""

import importlib

_SUBMODULES = {"claims", "experiments", "records", "stability", "routing_study", "attention_costs", "palette", "plots",
               "plots_stability", "seriation", "pretrained", "quantization_study"}


def pretrained_mini(*args, **kwargs):
    """`k2mini.lab.pretrained.pretrained_mini` (see there)."""
    from .pretrained import pretrained_mini as load

    return load(*args, **kwargs)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'k2mini.lab' has no attribute {name!r}")
