"""environment.yml mirrors pyproject.toml; the torch pin the Makefile uses is the constraint's."""

import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _env_pip():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    reqs = []
    for l in lines[start + 1 :]:
        s = l.strip()
        if s.startswith("- ") and not s.startswith("- -e"):
            reqs.append(s[2:].strip())
    return reqs


def test_environment_yml_mirrors_pyproject():
    project = _pyproject()
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    env = _env_pip()
    env_by_name = {_name(r): r for r in env}
    for req in wanted:
        name = _name(req)
        if name == "torch":
            continue  # pinned exactly in environment.yml, ranged in pyproject (checked below)
        assert name in env_by_name, f"environment.yml lacks {req}"
        assert env_by_name[name].replace(" ", "") == req.replace(" ", ""), f"{req} != {env_by_name[name]}"
    assert set(env_by_name) - {"torch"} == {_name(r) for r in wanted} - {"torch"}


def test_torch_pin_agrees():
    constraints = (ROOT / "constraints.txt").read_text()
    pin = re.search(r"^torch==(\S+)$", constraints, re.M).group(1)
    assert f"torch=={pin}" in _env_pip()
    assert f"torch=={pin}" in (ROOT / "Makefile").read_text()


def test_public_names_the_issues_promise():
    import inspect

    import k2mini

    for name in ("K2Config", "K2ForCausalLM", "load_pretrained", "save_pretrained", "pretrained_mini", "train"):
        assert callable(getattr(k2mini, name)), name
    assert "optimizer" in inspect.signature(k2mini.train).parameters  # the function, not the module
    assert callable(k2mini.optim.Muon) and callable(k2mini.optim.qk_clip_)
    assert callable(k2mini.analysis.router_summary) and callable(k2mini.analysis.stream_activations)
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        k2mini.nonesuch


def test_the_library_never_imports_the_lab_nor_its_libraries():
    """Importing k2mini and every core module (subpackages included) loads nothing from k2mini.lab,
    nor scipy or seaborn (the lab's libraries, in the [lab] extra)."""
    import subprocess
    import sys

    core = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "k2mini").rglob("*.py")
        if "lab" not in p.relative_to(ROOT / "k2mini").parts and p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {core!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'seaborn')\n"
        "             or m == 'k2mini.lab' or m.startswith('k2mini.lab.'))\n"
        "assert not bad, bad[:10]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
