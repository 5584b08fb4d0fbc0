"""The dispatch schematic draws for K2 (EP 16) and the k2-micro of notebook 06, with each config's own sizes."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from k2mini import K2Config  # noqa: E402
from k2mini.lab.schematics.dispatch import draw_dispatch  # noqa: E402


def labels(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


@pytest.mark.parametrize("name, degree", [("kimi-k2", 16), ("k2-micro", 2), ("deepseek-v3", 4)])
def test_draws_with_the_configs_sizes(name, degree):
    c = K2Config.preset(name)
    fig = draw_dispatch(c, degree)
    text = labels(fig)
    plt.close(fig)
    E, n_local = c.n_routed_experts, c.n_routed_experts // degree
    assert f"top-{c.num_experts_per_tok} of {E}" in text
    assert f"SwiGLU {c.hidden_size} -> {c.moe_intermediate_size} -> {c.hidden_size}" in text
    assert f"over {degree} ranks ({n_local} each)" in text
    assert f"experts {E - n_local}..{E - 1}" in text  # the last rank holds the last E/d experts


def test_many_ranks_are_elided_and_a_bad_degree_is_refused():
    k2 = K2Config.preset("kimi-k2")
    text = labels(draw_dispatch(k2, 16))
    plt.close("all")
    assert "... 12 more\nranks ..." in text and "rank 15" in text and "rank 2:" not in text
    with pytest.raises(ValueError, match="degree must divide n_routed_experts=384"):
        draw_dispatch(k2, 5)
