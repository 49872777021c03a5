"""Command line: ``carl-train`` and ``python -m carlreg train``.

Each subcommand calls the public API and turns its progress reports into a bar on a
terminal (``--progress bar``), JSON lines on stdout (``--progress json``: ``stage``, ``step``,
``total``, ``fraction``, ``eta_s``, ``message``) or nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, List, Optional

from .progress import Cancelled, Progress

__all__ = ["main", "train_main"]


def progress_printer(kind: str) -> Optional[Callable[[Progress], None]]:
    """The progress callback for ``--progress bar|json|none``."""
    if kind == "none":
        return None
    if kind == "json":
        return lambda report: print(json.dumps(report.to_dict()), flush=True)

    def bar(report: Progress) -> None:
        width = 30
        filled = int(width * report.fraction)
        eta = f"{report.eta_s:.0f}s" if report.eta_s is not None else "?"
        line = f"\r{report.stage} [{'#' * filled}{'.' * (width - filled)}] {report.step}/{report.total} ETA {eta} {report.message}"
        sys.stderr.write(line[:160])
        if report.step >= report.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return bar


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def train_main(argv: Optional[List[str]] = None) -> int:
    """``carl-train [--config FILE] [--set KEY=VALUE ...] [--device D] [--progress P] [--max-steps N]``."""
    from .device import resolve_device
    from .train import TrainConfig, train

    parser = argparse.ArgumentParser(prog="carl-train", description="Train a CARL network (resumes from OUTPUT/checkpoint.pt).")
    parser.add_argument("--config", help="JSON file of TrainConfig settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting (JSON value)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar" if sys.stderr.isatty() else "none")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps in this run (a checkpoint is written)")
    args = parser.parse_args(argv)
    try:
        values = json.loads(open(args.config).read()) if args.config else {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"carl-train: --set expects KEY=VALUE, got {item!r}")
            values[key] = _parse_value(value)
        config = TrainConfig.from_dict(values)
        train(config, resolve_device(args.device), progress_printer(args.progress), max_steps_this_run=args.max_steps)
    except Cancelled as err:
        print(f"carl-train: {err}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"carl-train: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m carlreg <subcommand> ...``."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m carlreg {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
