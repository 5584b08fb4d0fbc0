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

    import k2mini.lab

    for name in ("K2Config", "K2ForCausalLM", "load_pretrained", "save_pretrained", "train"):
        assert callable(getattr(k2mini, name)), name
    assert callable(k2mini.lab.pretrained_mini)  # the lab's: the package root does not forward to it
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


def _core_files():
    return sorted(p for p in (ROOT / "k2mini").rglob("*.py") if "lab" not in p.relative_to(ROOT / "k2mini").parts)


def _lab_imports(path, package: str | None = None) -> list[str]:
    """Every place in `path` that imports k2mini.lab: import statements at any depth (inside functions
    too, relative or absolute) and `importlib.import_module` calls whose name mentions the lab."""
    import ast

    package = package or ".".join(path.relative_to(ROOT).parent.parts)  # e.g. k2mini.checkpoint
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            names = [n.replace(".", "k2mini.", 1) if n.startswith(".") else n for n in names]
        found += [f"{path.name}:{node.lineno} {n}" for n in names if n == "k2mini.lab" or n.startswith("k2mini.lab.")]
    return found


def test_no_core_module_imports_the_lab_even_lazily():
    """The arrows point down: no import of k2mini.lab anywhere in the core's source, the package root and
    function-level imports included (the test above only sees what importing the modules loads)."""
    bad = [hit for path in _core_files() for hit in _lab_imports(path)]
    assert not bad, bad


def test_the_lab_import_scan_sees_lazy_and_relative_imports(tmp_path):
    """The scan's control: the forms a lazy upward import takes are all found."""
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib\n\ndef f():\n    from ..lab import plots\n    import k2mini.lab.records\n"
                     "    return importlib.import_module('.lab', 'k2mini')\n")
    hits = _lab_imports(probe, package="k2mini.checkpoint")
    assert len(hits) == 4, hits  # `..lab`, `..lab.plots`, `k2mini.lab.records`, import_module('.lab')
