"""compile_layers()'s guard: refusal names the reason and the settings; compiled code runs only while
autograd records. Faults are injected into the probe's child, so no compilation runs here."""

import pytest
import torch

from k2mini import K2Config, K2ForCausalLM
from k2mini.compile_guard import CompileUnsafeError, GradOnly, check_compile, verdict

CONFIG = K2Config.preset("k2-micro")


@pytest.mark.parametrize("code, reason", [
    ("import os; os.abort()", "killed by SIGABRT"),
    ("import sys; sys.exit('C++ compile error')", "failed (exit 1): C++ compile error"),
    ("print('{\"logits\": 1e17, \"grads\": 0.0}')", "logits differ from eager's by 1e+17"),
    ("print('{\"logits\": NaN, \"grads\": 0.0}')", "logits differ from eager's by nan"),
    ("print('{\"logits\": 0.0, \"grads\": 0.5}')", "gradients differ"),
    ("print('no json')", "printed no result"),
])
def test_a_probe_that_crashes_fails_or_differs_is_a_refusal(code, reason):
    got = check_compile(CONFIG, 2, probe_code=code)
    assert got is not None and reason in got


def test_a_probe_that_agrees_is_no_refusal():
    assert check_compile(CONFIG, 1, probe_code="print('{\"logits\": 2e-7, \"grads\": 1e-7}')") is None
    assert verdict(0, '{"logits": 1e-5, "grads": 1e-5}\n', "") is None


def test_refusal_is_an_error_naming_the_settings(monkeypatch):
    import k2mini.compile_guard as guard

    monkeypatch.setattr(guard, "check_compile", lambda *a, **k: "the probe process was killed by SIGABRT")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    model = K2ForCausalLM(CONFIG)
    with pytest.raises(CompileUnsafeError, match=r"refused.*thread.*ATEN_CPU_CAPABILITY=avx2.*SIGABRT.*stays eager"):
        model.compile_layers()
    assert not isinstance(model.model.norm.forward, GradOnly)  # left eager


def test_compiled_code_runs_only_while_autograd_records():
    calls = []
    f = GradOnly(lambda x: calls.append("eager") or x, lambda x: calls.append("compiled") or x, torch.get_num_threads())
    x = torch.ones(2)
    f(x)
    with torch.no_grad():
        f(x)
    with torch.inference_mode():
        f(x)
    assert calls == ["compiled", "eager", "eager"]
    g = GradOnly(lambda x: calls.append("eager") or x, lambda x: calls.append("compiled") or x, torch.get_num_threads() + 1)
    with pytest.warns(RuntimeWarning, match="running eager"):
        g(x)
    assert calls[-1] == "eager"


def test_a_deep_copy_runs_its_own_weights_eager(monkeypatch):
    """The compiled callables are bound to the original module; a copy must not run the original's weights."""
    import copy

    import k2mini.compile_guard as guard

    monkeypatch.setattr(guard, "check_compile", lambda *a, **k: None)
    # no compilation here: like torch.compile's wrapper, a closure over the original module's forward
    monkeypatch.setattr(torch, "compile", lambda f, **k: (lambda *a, **kw: f(*a, **kw)))
    model = K2ForCausalLM(CONFIG).compile_layers()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.norm.weight.mul_(2)
    x = torch.randn(1, 3, CONFIG.hidden_size)
    assert torch.allclose(twin.model.norm(x), 2 * model.model.norm(x))
    assert not isinstance(twin.model.norm.forward, GradOnly) and twin.model.norm.forward.__self__ is twin.model.norm
