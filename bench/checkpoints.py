"""Which training checkpoint to ship, judged on validation subjects, never on the test pair.

For each weights file (a carl-train checkpoint, a state_dict, or a shipped model's name): the two
ends of the translation sweep, on validation subjects instead of the test pair that the
benchmarks report (``bench/brain.py --sweep``): the fixed image's content shifted within its grid
by 0 mm and by ``--offset`` mm along each axis, after the two brains' centroids are aligned (what
leaves its 256 mm field of view is lost; ``bench/brain.py``'s ``make_pairs``), for the pairs
16 → 17 and 17 → 18 (``carlreg.data.SPLITS["validation"]``). Ours without instance optimization,
each registration in a fresh process. Figures: mean Dice over brain structures per point (mean of
the pairs), ``drop``, the largest loss from the 0 mm value along any axis (the sweep's
acceptance asks for at most 0.02 up to 60 mm), and ``deep``, the mean Dice over the deep grey
structures at 0 mm (``brain.DEEP_GREY``: fine-tuning on large shifts can trade their alignment for
the head's outline while the mean barely moves).

Usage: python bench/checkpoints.py MODEL [MODEL ...] [--offset 60] [--output NAME]
Prints the table; with ``--output`` also writes bench/results/NAME.{txt,json}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from brain import AXES, RESULTS, make_pairs, run_in_fresh_process, sweep_shift  # noqa: E402
from baselines import versions  # noqa: E402
from carlreg.data import SPLITS  # noqa: E402

#: the validation pairs (moving, fixed)
PAIRS = tuple(zip(SPLITS["validation"][:-1], SPLITS["validation"][1:]))


def evaluate(models, offset_mm: float) -> list:
    """Per model: mean Dice over :data:`PAIRS` at 0 mm and at ``offset_mm`` along each axis, and
    the largest drop. Each pair is synthesised once per point and registered by every model."""
    points = {"0 mm": [0.0, 0.0, 0.0], **{name.split()[0]: sweep_shift(axis, offset_mm) for name, axis in AXES.items()}}
    dice = {model: {point: [] for point in points} for model in models}
    deep = {model: [] for model in models}
    for subjects in PAIRS:
        for point, shift in points.items():
            with tempfile.TemporaryDirectory(prefix="bench-checkpoints-") as folder:
                moving, fixed = make_pairs(Path(folder), shift, subjects=subjects)[0]
                for model in models:
                    figures = run_in_fresh_process("ours", moving, fixed, model, 0)
                    dice[model][point].append(figures["dice"])
                    if point == "0 mm":
                        deep[model].append(figures["dice_deep"])
    rows = []
    for model, per_pair in dice.items():
        means = {point: sum(values) / len(values) for point, values in per_pair.items()}
        rows.append({"model": model, "dice": means, "per_pair": per_pair,
                     "drop": max(means["0 mm"] - means[point] for point in points if point != "0 mm"),
                     "deep": sum(deep[model]) / len(deep[model])})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="weights files, checkpoints or shipped model names")
    parser.add_argument("--offset", type=float, default=60.0, help="the far end of the sweep (mm)")
    parser.add_argument("--output", default="", help="also write bench/results/OUTPUT.{txt,json}")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = evaluate(args.models, args.offset)
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    pairs = ", ".join(f"{m} → {f}" for m, f in PAIRS)
    lines = [f"# bench/checkpoints.py, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, {versions()}; "
             f"validation pairs {pairs}, mean Dice of brain structures, ours without IO; offset {args.offset:g} mm",
             f"{'model':<48} {'0 mm':>6} {'x':>6} {'y':>6} {'z':>6} {'drop':>6} {'deep':>6}"]
    for row in rows:
        lines.append(f"{row['model']:<48} " + " ".join(f"{value:6.3f}" for value in row["dice"].values())
                     + f" {row['drop']:6.3f} {row['deep']:6.3f}")
    text = "\n".join(lines)
    print(text)
    if args.output:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.output}.txt").write_text(text + "\n")
        (RESULTS / f"{args.output}.json").write_text(json.dumps(
            {"date": str(datetime.date.today()), "offset_mm": args.offset, "pairs": PAIRS, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
