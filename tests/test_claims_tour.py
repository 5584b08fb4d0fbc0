"""Notebooks 00 and 01's measured claims: False on their negative controls, True on positive ones.

The untrained-router claim runs on the real k2-mini of notebook 00 (text against random bytes, and
random bytes against other random bytes); the decode-time claim is tested on given times (a timed unit
test would measure the machine, not the claim)."""

import pytest
import torch

from k2mini import ByteTokenizer, K2Config, K2ForCausalLM
from k2mini.lab.claims.tour import absorbed_decode_faster, text_leaves_experts_unused

TEXT = ("Kimi K2 is a mixture-of-experts language model with about a trillion parameters, of which "
        "32 billion are active for any one token. Each layer uses multi-head latent attention, and "
        "all but the first route every token to 8 of 384 experts plus one shared expert. ")


@pytest.fixture(scope="module")
def unused():
    """Experts without a token per MoE layer of notebook 00's untrained k2-mini (seed 0), for its text and
    for two draws of as many uniformly random bytes."""
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("k2-mini")).eval()
    stream = torch.tensor(ByteTokenizer().encode(TEXT * 2))[:256]
    inputs = {"text": stream.view(4, 64)}
    for i in (1, 2):
        inputs[f"random{i}"] = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        return {k: (model(x, telemetry=True).telemetry.loads == 0).sum(-1).tolist() for k, x in inputs.items()}


def test_claim_text_leaves_experts_unused_on_the_real_mini(unused):
    v = text_leaves_experts_unused(unused["text"], unused["random1"])
    assert v and v.margin > 0, v.explain()


def test_claim_text_leaves_experts_unused_fails_on_random_bytes(unused):
    assert not text_leaves_experts_unused(unused["random2"], unused["random1"])  # both arms random bytes
    assert not text_leaves_experts_unused(unused["random1"], unused["text"])  # arms swapped
    assert not text_leaves_experts_unused([4, 11, 14], [4, 11, 14])  # identical


def test_claim_absorbed_decode_faster():
    contexts = [128, 256, 512, 1024, 2048]
    naive = [7.9e-3, 10.3e-3, 18.3e-3, 29.6e-3, 58.1e-3]
    absorbed = [4.8e-3, 4.6e-3, 5.1e-3, 5.7e-3, 6.7e-3]
    v = absorbed_decode_faster(contexts, naive, absorbed)
    assert v and v.margin == pytest.approx(58.1 / 6.7 - 2)
    assert not absorbed_decode_faster(contexts, naive, naive)  # the naive form against itself
    assert not absorbed_decode_faster(contexts, absorbed, naive)  # arms swapped
    assert not absorbed_decode_faster(contexts, [a * 3 for a in absorbed], absorbed)  # faster, but not growing
    with pytest.raises(ValueError):
        absorbed_decode_faster(contexts, naive[:2], absorbed)
