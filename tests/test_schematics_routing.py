"""The routing schematic draws for K2 and DeepSeek-V3 (groups on), with each config's own sizes."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from k2mini import K2Config  # noqa: E402
from k2mini.lab.schematics.routing import draw_routing  # noqa: E402


def labels(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


@pytest.mark.parametrize("name", ["kimi-k2", "deepseek-v3", "k2-mini"])
def test_draws_with_the_configs_sizes(name):
    c = K2Config.preset(name)
    fig = draw_routing(c)
    text = labels(fig)
    plt.close(fig)
    assert f"top-{c.num_experts_per_tok} of {c.n_routed_experts}" in text
    assert f"{c.n_routed_experts} x {c.hidden_size}" in text
    assert f"{c.routed_scaling_factor:g}" in text


def test_the_group_limit_is_drawn_only_where_the_config_has_groups():
    k2, v3 = (draw_routing(K2Config.preset(n)) for n in ("kimi-k2", "deepseek-v3"))
    k2_text, v3_text = labels(k2), labels(v3)
    plt.close("all")
    assert "group limit: off" in k2_text and "384 experts" in k2_text
    assert "8 groups of 32" in v3_text and "keep the best 4" in v3_text
