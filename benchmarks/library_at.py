"""A git revision's k2mini imported beside the checkout's, under another name (`k2mini_<sha>`), so that one
process can time today's library against an earlier one, runs interleaved (the machine's load then hits
both alike). The revision's `k2mini/` is extracted with `git archive` into a temporary folder, removed at exit;
k2mini imports itself only relatively, so the copy is a separate package with its own modules.
"""

from __future__ import annotations

import atexit
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def library_at(rev: str):
    """The k2mini package of git revision `rev` of this repository, imported as `k2mini_<short sha>`."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", sha, "k2mini"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
        raise SystemExit(f"--against {rev}: cannot read that revision's k2mini/ with git: {detail.strip() or e}")
    name = f"k2mini_{sha}"
    if name not in sys.modules:
        root = Path(tempfile.mkdtemp(prefix="bench_k2mini_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(root, filter="data")
        (root / "k2mini").rename(root / name)
        sys.path.insert(0, str(root))
    return importlib.import_module(name)
