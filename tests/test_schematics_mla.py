"""The MLA schematic draws for K2 and for a mini, with each config's own sizes in its labels."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from k2mini import K2Config  # noqa: E402
from k2mini.lab.schematics.mla import draw_mla  # noqa: E402


def labels(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


@pytest.mark.parametrize("name", ["kimi-k2", "k2-mini"])
def test_draws_with_the_configs_sizes(name):
    c = K2Config.preset(name)
    fig = draw_mla(c)
    text = labels(fig)
    plt.close(fig)
    for size in (c.hidden_size, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim, c.kv_lora_rank + c.qk_rope_head_dim,
                 c.num_attention_heads * c.v_head_dim):
        assert str(size) in text, (name, size)
    assert f"{c.num_attention_heads} heads x {c.qk_nope_head_dim}" in text


def test_k2_labels_are_k2s():
    fig = draw_mla(K2Config.preset("kimi-k2"))
    text = labels(fig)
    plt.close(fig)
    for s in ("7168", "1536", "512 + 64 = 576", "64 heads x 128", "64 heads x 64"):
        assert s in text, s


def test_draws_into_a_given_axes():
    fig, ax = plt.subplots()
    assert draw_mla(K2Config.preset("k2-micro"), ax=ax) is fig
    plt.close(fig)
