"""``carl-train`` (``python -m carlreg train``): train a CARL network from a JSON configuration.

Kept apart from :mod:`carlreg.cli`, whose registration commands are all the Slicer extension
ships: training, its data sources and the retina experiment stay out of the extension.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .cli import progress_printer, run_command

__all__ = ["train_main"]


def _torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def train_main(argv: Optional[List[str]] = None) -> int:
    """``carl-train [--config FILE] [--set KEY=VALUE ...] [--device D] [--progress P] [--max-steps N]``."""
    parser = argparse.ArgumentParser(prog="carl-train", description="Train a CARL network (resumes from OUTPUT/checkpoint.pt).")
    parser.add_argument("--config", help="JSON file of TrainConfig settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting (JSON value)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar" if sys.stderr.isatty() else "none")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps in this run (a checkpoint is written)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop after the step during which this much wall time has passed (a checkpoint is written; "
                             "for a burst on a GPU: the run resumes on any device)")
    args = parser.parse_args(argv)

    def body() -> None:
        from pathlib import Path

        from .device import resolve_device
        from .train import TrainConfig, init_distributed_from_environment, train

        values = json.loads(Path(args.config).read_text()) if args.config else {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
            values[key] = _parse_value(value)
        config = TrainConfig.from_dict(values)
        local_rank = init_distributed_from_environment()
        device = args.device
        if local_rank is not None and device in ("auto", "cuda") and _torch_cuda_available():
            device = f"cuda:{local_rank}"
        train(config, resolve_device(device), progress_printer(args.progress), max_steps_this_run=args.max_steps,
              max_seconds_this_run=None if args.max_minutes is None else 60.0 * args.max_minutes)

    return run_command("carl-train", body)
