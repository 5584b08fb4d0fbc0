"""lab.quantization_study: the same weights saved as fp8 (K2) and INT4 (K2-Thinking) against the
unquantized ones: expert errors, routing changes, loss and max-logit changes."""

import pytest
import torch

import k2mini
from k2mini.checkpoint import load_pretrained, save_pretrained
from k2mini.lab.quantization_study import quantization_study, stored_bytes, topk_overlap

pytest.importorskip("pandas")


def test_topk_overlap_counts_shared_experts():
    a = torch.tensor([[0, 1], [2, 3], [4, 5]])
    b = torch.tensor([[1, 0], [3, 6], [6, 7]])
    assert topk_overlap(a, b, 8).tolist() == [2, 1, 0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = k2mini.K2Config.preset("k2-micro").replace(num_hidden_layers=3)
    model = k2mini.K2ForCausalLM(config).eval()
    with torch.no_grad():  # a larger spread than init, so that routing is not a coin toss
        for layer in model.moe_layers():
            layer.mlp.gate.weight.mul_(20)
    root = tmp_path_factory.mktemp("quant")
    out = {"float32": model}
    for q in ("fp8", "int4"):
        out[q] = load_pretrained(save_pretrained(model, root / q, quantization=q, progress=False), progress=False)
    return config, out, root


def test_stored_bytes(models):
    config, _, root = models
    E, L, H, I = config.n_routed_experts, config.n_moe_layers, config.hidden_size, config.moe_intermediate_size
    n = 3 * H * I * E * L  # routed expert parameters
    int4, fp8 = stored_bytes(root / "int4"), stored_bytes(root / "fp8")
    assert int4["experts"] == n // 2 + 2 * n // 32 + 4 * 2 * 3 * E * L  # 4 bits, a bf16 per 32, an int32 (2,) shape
    assert fp8["experts"] == n + 4 * E * L * (2 * -(-I // 128) * -(-H // 128) + -(-H // 128) * -(-I // 128))


def test_study_of_fp8_and_int4(models):
    config, ms, _ = models
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    study = quantization_study(ms, ids)
    E, L = config.n_routed_experts, config.n_moe_layers
    assert list(study.expert_error.columns) == ["fp8", "int4"] and len(study.expert_error) == L * E
    # INT4 (16 levels per 32 columns) moves every expert further than fp8 (e4m3, 3 mantissa bits) does
    assert (study.expert_error["int4"] > study.expert_error["fp8"]).all()
    assert (study.expert_error["fp8"] < 0.05).all() and (study.expert_error["int4"] < 0.2).all()
    assert list(study.summary.index) == ["float32", "fp8", "int4"]
    assert (study.summary.loc["float32"] == 0).drop("loss").all()
    routing = study.routing
    assert ((routing["int4", "changed"] >= 0) & (routing["int4", "changed"] <= 1)).all()
    assert ((routing["int4", "overlap"] > 0.5) & (routing["int4", "overlap"] <= 1)).all()
    assert list(study.max_logits.columns) == ["float32", "fp8", "int4"] and len(study.max_logits) == config.num_hidden_layers


def test_a_model_against_itself_changes_nothing(models):
    config, ms, _ = models
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    study = quantization_study({"a": ms["int4"], "b": ms["int4"]}, ids)
    assert (study.expert_error["b"] == 0).all()
    assert (study.routing["b", "changed"] == 0).all() and (study.routing["b", "overlap"] == 1).all()
    assert (study.summary.loc["b"] == study.summary.loc["a"]).drop("loss").all()
