"""Where data lives: the folder that holds fetched corpora (and, for the lab, cached runs).

The first of these that applies, in this order:

1. an explicit ``root=`` argument;
2. the ``K2MINI_DATA`` environment variable (the Makefile sets it to the checkout's ``data/``);
3. the ``data/`` folder of the k2mini checkout the process runs in: the working directory or the
   nearest folder above it that holds a ``pyproject.toml`` naming the project ``k2mini`` beside a
   ``data/`` folder (so a notebook running in ``notebooks/`` finds ``../data``). Where the package is
   installed plays no part: an installed or editable k2mini used from another project never writes
   into a checkout the user is not working in;
4. a user cache folder: ``$XDG_CACHE_HOME/k2mini``, or ``~/.cache/k2mini``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

__all__ = ["data_root", "default_data_root", "find_checkout"]

ENV_VAR = "K2MINI_DATA"
PROJECT_NAME = "k2mini"


def _is_checkout(folder: Path) -> bool:
    if not (folder / "data").is_dir():
        return False
    try:
        with open(folder / "pyproject.toml", "rb") as f:
            return tomllib.load(f).get("project", {}).get("name") == PROJECT_NAME
    except (OSError, tomllib.TOMLDecodeError):
        return False


def find_checkout(start: str | os.PathLike | None = None) -> Path | None:
    """The k2mini checkout holding ``start`` (default: the working directory), or None."""
    here = Path.cwd() if start is None else Path(start)
    here = here.resolve()
    return next((folder for folder in (here, *here.parents) if _is_checkout(folder)), None)


def _user_cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"  # XDG: relative ones are invalid
    return base / PROJECT_NAME


def default_data_root() -> Path:
    """The data folder when no ``root=`` is given: ``$K2MINI_DATA``, else the working checkout's
    ``data/``, else the user cache folder (see the module docstring)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    checkout = find_checkout()
    if checkout is not None:
        return checkout / "data"
    return _user_cache()


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` as a Path when given, else ``default_data_root()``."""
    return default_data_root() if root is None else Path(root)
