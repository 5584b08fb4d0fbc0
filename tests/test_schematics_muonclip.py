"""The MuonClip schematic draws for any config and labels the config's own sizes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from k2mini import K2Config
from k2mini.lab.schematics.muonclip import draw_muonclip


def _texts(fig) -> str:
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])


@pytest.mark.parametrize("preset", ["kimi-k2", "k2-micro"])
def test_it_draws_and_labels_the_configs_sizes(preset):
    c = K2Config.preset(preset)
    fig = draw_muonclip(c)
    text = _texts(fig)
    for size in (c.num_hidden_layers, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                 c.kv_lora_rank, c.hidden_size):
        assert str(size) in text, (preset, size)
    assert "untouched" in text and "shared by all" in text
    plt.close(fig)


def test_kimi_k2_labels():
    """K2's own sizes: 61 layers x 64 heads, head dims 128 / 64 / 128, KV latent 512, hidden 7168."""
    fig = draw_muonclip(K2Config.preset("kimi-k2"))
    text = _texts(fig)
    for label in ("61 layers x 64 heads", "content 128 / rope 64 / value 128", "KV latent 512", "hidden 7168",
                  "[12288, 1536]"):
        assert label in text, label
    plt.close(fig)


def test_it_draws_into_a_given_axes():
    fig, ax = plt.subplots()
    assert draw_muonclip(K2Config.preset("k2-micro"), ax=ax) is fig
    plt.close(fig)
