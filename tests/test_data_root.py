"""k2mini.data.root: where data lives. root=, else $K2MINI_DATA, else the working checkout's data/
(found from the cwd, never from where the package is installed), else the user cache folder."""

from pathlib import Path

import pytest

from k2mini.data import CorpusNotFoundError, data_root, default_data_root, load_corpus
from k2mini.data.root import find_checkout

ROOT = Path(__file__).resolve().parents[1]


def make_checkout(folder: Path, name: str = "k2mini", data: bool = True) -> Path:
    (folder / "notebooks" / "deep").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(f'[project]\nname = "{name}"\nversion = "0"\n')
    if data:
        (folder / "data").mkdir()
    return folder.resolve()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No K2MINI_DATA, a fake home, no XDG_CACHE_HOME; the cwd outside any checkout."""
    monkeypatch.delenv("K2MINI_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return monkeypatch


def test_explicit_root_comes_first(clean_env, tmp_path):
    clean_env.setenv("K2MINI_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "mine") == tmp_path / "mine"
    assert data_root(str(tmp_path / "mine")) == tmp_path / "mine"
    assert data_root() == tmp_path / "env"


def test_environment_variable_beats_the_checkout(clean_env, tmp_path):
    checkout = make_checkout(tmp_path / "co")
    clean_env.chdir(checkout)
    clean_env.setenv("K2MINI_DATA", str(tmp_path / "env"))
    assert default_data_root() == tmp_path / "env"
    with pytest.raises(CorpusNotFoundError, match=str(tmp_path / "env" / "shakespeare")):
        load_corpus("shakespeare")  # the loaders use the default too
    clean_env.setenv("K2MINI_DATA", "")  # empty counts as unset
    assert default_data_root() == checkout / "data"


@pytest.mark.parametrize("cwd", [".", "notebooks", "notebooks/deep"])
def test_checkout_is_found_from_the_working_directory(clean_env, tmp_path, cwd):
    checkout = make_checkout(tmp_path / "co")
    clean_env.chdir(checkout / cwd)
    assert find_checkout() == checkout
    assert default_data_root() == checkout / "data"


@pytest.mark.parametrize("kind", ["other project", "no data folder", "broken pyproject"])
def test_only_a_k2mini_checkout_with_data_counts(clean_env, tmp_path, kind):
    folder = make_checkout(tmp_path / "co", name="other" if kind == "other project" else "k2mini",
                           data=kind != "no data folder")
    if kind == "broken pyproject":
        (folder / "pyproject.toml").write_text("[project\nname = ")
    clean_env.chdir(folder / "notebooks")
    assert find_checkout() is None
    assert default_data_root() == tmp_path / "home" / ".cache" / "k2mini"


def test_installed_location_plays_no_part(clean_env, tmp_path):
    # this test file lives in a checkout beside the imported package; from a cwd outside it, the
    # data does not go there
    assert (ROOT / "pyproject.toml").is_file()
    assert find_checkout() is None
    assert default_data_root() == tmp_path / "home" / ".cache" / "k2mini"


def test_user_cache_honours_xdg(clean_env, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == tmp_path / "xdg" / "k2mini"
    clean_env.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid per the XDG spec: ignored
    assert default_data_root() == tmp_path / "home" / ".cache" / "k2mini"
