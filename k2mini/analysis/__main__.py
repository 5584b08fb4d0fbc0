"""Sparse-activation analysis of a checkpoint from a terminal.

    python -m k2mini.analysis SOURCE --text FILE [--text FILE2 ...] [--static] [--out results.json]

SOURCE is a checkpoint directory, hf://owner/repo or an http(s) URL. --static summarizes the routers
and correction biases from the weights alone (reading ~0.03% of K2's bytes); each --text file is
tokenized with the checkpoint's own tokenizer and streamed through the model layer by layer, with
routing counts kept per file (label: the file name, or LABEL=FILE). --out writes everything to one JSON
file that `k2mini.analysis.load_results` reads back; it is checked to be writable before the analysis
starts and written atomically (a temporary file beside it, renamed over it).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path


def _text_args(specs: list[str]) -> dict[str, str]:
    texts = {}
    for spec in specs:
        label, sep, name = spec.partition("=")
        if not sep or not label or Path(spec).exists():
            label, name = Path(spec).stem, spec
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--text {name}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--text {name}: not UTF-8 text ({e})") from None
        base, n = label, 2
        while label in texts:
            label, n = f"{base}-{n}", n + 1
        texts[label] = text
    return texts


def _check_writable(option: str, path: str | None, is_dir: bool) -> None:
    """Fail now, not after the analysis, if `path` cannot be written: create its folder and a probe file."""
    if path is None:
        return
    target = Path(path)
    folder = target if is_dir else target.parent
    if not is_dir and target.is_dir():
        raise ValueError(f"{option} {path}: cannot be written: it is a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{target.name}.probe-{secrets.token_hex(4)}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot be written ({e.strerror or e})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m k2mini.analysis",
        description="Which experts fire, how evenly, with which others, for which text; and what the routers look like.",
    )
    p.add_argument("source", help="checkpoint directory, hf://owner/repo or http(s) URL")
    p.add_argument("--text", action="append", default=[], metavar="[LABEL=]FILE", help="text to stream (repeatable)")
    p.add_argument("--static", action="store_true", help="summarize routers and correction biases (weights only)")
    p.add_argument("--experts", action="store_true", help="with --static: also per-expert weight norms (reads every expert)")
    p.add_argument("--layers", default=None, help="layers: N, START:STOP or N,M,... (default: all)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--rows", type=int, default=None, help="at most this many sequences per text file")
    p.add_argument("--state-dir", default=None, help="resumable state: rerun with the same arguments to continue")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    import pandas as pd

    from ..checkpoint import CheckpointError, NetworkError
    from . import encode_batch, load_tokenizer, parse_layers, router_summary, save_results, stream_activations
    from .source import open_reader

    args = build_parser().parse_args(argv)
    if not args.text and not args.static:
        print("error: nothing to do; give --text FILE and/or --static", file=sys.stderr)
        return 2
    progress = not args.no_progress
    pd.set_option("display.width", 160)
    try:
        _check_writable("--out", args.out, is_dir=False)  # results are written atomically at the end
        _check_writable("--state-dir", args.state_dir, is_dir=True)
        layers = parse_layers(args.layers)
        texts = _text_args(args.text)
        reader, _ = open_reader(args.source)
        with reader:
            summary = stream = None
            if args.static:
                summary = router_summary(reader, layers=layers, experts=args.experts, progress=progress)
                cols = ["bias_offset", "bias_std", "bias_min", "bias_max", "bias_favoured",
                        "router_norm_mean", "router_cos_mean", "router_cos_max"]
                cols += [c for c in ("expert_norm_mean", "expert_norm_std") if c in summary]
                print(summary[cols].round(4).to_string())
                a = summary.attrs
                print(f"static: read {a['bytes_read']:,} of {a['checkpoint_bytes']:,} bytes ({a['read_fraction']:.4%})")
            if texts:
                ids, labels = encode_batch(load_tokenizer(reader), texts, args.seq_len, args.rows)
                before = reader.bytes_read
                stream = stream_activations(reader, ids, layers=layers, labels=labels, state_dir=args.state_dir,
                                            progress=progress)
                print(stream.layer_frame().round(4).to_string())
                print(f"stream: {stream.n_tokens:,} tokens in {ids.shape[0]} sequences of {ids.shape[1]}; "
                      f"read {reader.bytes_read - before:,} bytes")
        if args.out:
            save_results(args.out, summary=summary, stream=stream, extra={"texts": list(texts)})
            print(f"wrote {args.out}")
    except (CheckpointError, NetworkError, ValueError, TypeError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
