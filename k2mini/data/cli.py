"""The command line: ``python -m k2mini.data fetch [NAME] [--root DIR] [--force]`` and ``... info``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .corpus import load_corpus
from .errors import CorpusError
from .fetch import FETCHABLE, MARKER, fetch_corpus

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k2mini.data", description="k2mini corpora")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and verify a corpus (default: shakespeare)")
    fetch.add_argument("name", nargs="?", default="shakespeare", choices=sorted(FETCHABLE))
    fetch.add_argument(
        "--root", default=None, help="data folder (default: $K2MINI_DATA, else the working checkout's data/, else ~/.cache/k2mini)",
    )
    fetch.add_argument("--force", action="store_true", help="fetch again even if already complete")
    info = sub.add_parser("info", help="print a corpus summary")
    info.add_argument("name", nargs="?", default="shakespeare", help="built-in name or a path")
    info.add_argument("--root", default=None, help="data folder (default: as for fetch)")
    info.add_argument("--max-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            folder = fetch_corpus(args.name, args.root, force=args.force)
            manifest = json.loads((folder / MARKER).read_text())
            n_files, n_bytes = len(manifest["files"]), manifest["total_bytes"]
            print(f"{args.name}: {n_files} files, {n_bytes:,} bytes in {folder}")
        else:
            corpus = load_corpus(args.name, args.root, args.max_bytes)
            print(corpus)
            print(json.dumps(corpus.meta, indent=1, default=str))
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
