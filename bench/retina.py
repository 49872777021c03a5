"""The paper's retina experiment (CARL §6.1, Fig. 3) with our CPU-trained models.

Both networks were trained the same way on the Baseline variant of ``drive2d``
(``weights/training/{carl,unet}-retina-2d.json``): CARL, and the displacement-only network (the
paper's variant 1: the same refinement steps with a U-Net first step). Each is evaluated on the
3 test images (DRIVE 21–23, unflipped and flipped, 10 fixed warps each: 60 pairs) for the
Baseline, Shift and Scale Shift variants — the same warps in every variant. Figures: mean vessel
Dice (moving vessel labels warped with nearest neighbour vs the fixed labels) before and after
registration, and the percentage of folding pixels (det J ≤ 0) of the maps, over the whole
image and over the fixed image's retina (its field of view). Then the
translation sweep (the paper's Fig. 4, in 2-D): the same pairs with the fixed image shifted down
by 0, 10, …, 50 pixels.

Usage: python bench/retina.py [--carl NAME_OR_FILE] [--unet NAME_OR_FILE] [--warps 10]
Writes bench/results/retina.{txt,csv,json,png}.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CARLRegistration"))

from carlreg.maps import sample  # noqa: E402
from carlreg.metrics import folding_percent, mean_dice  # noqa: E402
from carlreg.models import available_models, load_model, model_card  # noqa: E402
from carlreg.retina import POOL, RETINA_VARIANTS, DriveSource  # noqa: E402

RESULTS = REPO / "bench" / "results"
DRIVE = REPO.parent / "shared" / "data" / "drive"
#: downward shifts of the fixed image in the sweep, pooled pixels (50 = the Shift variant)
SWEEP_SHIFTS = (0, 10, 20, 30, 40, 50)
#: pixels of the fixed image above this are its retina (its field of view, vessels aside)
RETINA_LEVEL = 0.05


@torch.no_grad()
def score_pairs(models: dict, pairs, folding: bool = True) -> list:
    """One row per (pair, method incl. "none"): vessel Dice and, with ``folding``, the folding %
    of the map over the image and over the fixed image's retina."""
    rows = []
    for index in range(len(pairs.moving)):
        moving, fixed = pairs.moving[index : index + 1], pairs.fixed[index : index + 1]
        moving_labels, fixed_labels = pairs.moving_labels[index : index + 1], pairs.fixed_labels[index : index + 1]
        rows.append({"pair": index, "method": "none", "dice": mean_dice(moving_labels, fixed_labels),
                     **({"folding_percent": 0.0, "folding_in_retina_percent": 0.0} if folding else {})})
        for method, model in models.items():
            phi = model(moving, fixed)
            warped = sample(moving_labels.float(), phi, mode="nearest").round().long()
            row = {"pair": index, "method": method, "dice": mean_dice(warped, fixed_labels)}
            if folding:
                row["folding_percent"] = folding_percent(phi)
                row["folding_in_retina_percent"] = folding_percent(phi, fixed[0, 0] > RETINA_LEVEL)
            rows.append(row)
    return rows


def evaluate(models: dict, warps: int, folder: Path = DRIVE) -> list:
    """One row per (variant, pair, method): Dice and folding %."""
    return [
        {"variant": variant, **row}
        for variant in RETINA_VARIANTS
        for row in score_pairs(models, DriveSource(folder, "test", variant).fixed_set(warps))
    ]


def sweep(models: dict, warps: int, folder: Path = DRIVE) -> dict:
    """Mean Dice against the fixed image's downward shift (pooled pixels), Baseline warps:
    ``{method: {shift: dice}}`` (the paper's Fig. 4, in 2-D)."""
    source = DriveSource(folder, "test", "baseline")
    result: dict = {method: {} for method in ["none", *models]}
    for shift in SWEEP_SHIFTS:
        rows = score_pairs(models, source.fixed_set(warps, shift_rows=shift * POOL), folding=False)
        for method in result:
            result[method][shift] = statistics.mean(r["dice"] for r in rows if r["method"] == method)
    return result


def summarise(rows: list) -> dict:
    """``{method: {variant: {"dice": mean, "dice_sd": sd, "folding_percent": mean}}}``."""
    summary: dict = {}
    for row in rows:
        summary.setdefault(row["method"], {}).setdefault(row["variant"], []).append(row)
    return {
        method: {
            variant: {
                "dice": statistics.mean(r["dice"] for r in group),
                "dice_sd": statistics.stdev(r["dice"] for r in group),
                "folding_percent": statistics.mean(r["folding_percent"] for r in group),
                "folding_in_retina_percent": statistics.mean(r["folding_in_retina_percent"] for r in group),
                "pairs": len(group),
            }
            for variant, group in variants.items()
        }
        for method, variants in summary.items()
    }


def plot(summary: dict, shifts: dict, models: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pair = DriveSource(DRIVE, "test", "shift").fixed_set(1)
    panels = [("moving", pair.moving[0, 0]), ("fixed (Shift)", pair.fixed[0, 0])]
    with torch.no_grad():
        for method, model in models.items():
            panels.append((f"warped: {method}", sample(pair.moving[:1], model(pair.moving[:1], pair.fixed[:1]))[0, 0]))
    columns = 4 + len(panels)
    figure = plt.figure(figsize=(2.6 * columns, 4.6))
    bars = figure.add_subplot(1, columns, (1, 2))
    curves = figure.add_subplot(1, columns, (3, 4))
    for method, values in shifts.items():
        curves.plot(list(values), list(values.values()), "o-", label=method)
    curves.set_xlabel("downward shift of the fixed image (pixels)")
    curves.set_ylabel("mean vessel Dice")
    curves.set_ylim(0, 1)
    curves.set_title("translation sweep")
    curves.legend(fontsize=8)
    methods = list(summary)
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        values = [summary[method][v]["dice"] for v in RETINA_VARIANTS]
        errors = [summary[method][v]["dice_sd"] for v in RETINA_VARIANTS]
        bars.bar([i + k * width for i in range(len(RETINA_VARIANTS))], values, width, yerr=errors, label=method, capsize=2)
    bars.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(RETINA_VARIANTS))])
    bars.set_xticklabels(["Baseline", "Shift", "Scale Shift"])
    bars.set_ylabel(f"vessel Dice (mean ± sd, {summary['none']['baseline']['pairs']} test pairs)")
    bars.set_ylim(0, 1)
    bars.legend(loc="upper right", fontsize=8)
    bars.set_title("trained on Baseline")
    for k, (title, image) in enumerate(panels):
        axis = figure.add_subplot(1, columns, 5 + k)
        axis.imshow(image, cmap="gray", vmin=0, vmax=1)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carl", default="carl-retina-2d", help="shipped model name or weights/checkpoint file")
    parser.add_argument("--unet", default="unet-retina-2d", help="the displacement-only network, likewise")
    parser.add_argument("--warps", type=int, default=10, help="warps per test image and flip")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    models = {"CARL": load_model(args.carl, "cpu"), "displacement-only": load_model(args.unet, "cpu")}
    rows = evaluate(models, args.warps)
    summary = summarise(rows)
    shifts = sweep(models, args.warps)
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = (f"# bench/retina.py, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}; models: CARL={args.carl}, displacement-only={args.unet}")
    lines = [header, f"{'method':<18} {'variant':<12} {'Dice mean':>9} {'sd':>6} {'folding %':>9} {'in retina %':>11}"]
    for method, variants in summary.items():
        for variant, figures in variants.items():
            lines.append(f"{method:<18} {variant:<12} {figures['dice']:9.3f} {figures['dice_sd']:6.3f} "
                         f"{figures['folding_percent']:9.3f} {figures['folding_in_retina_percent']:11.3f}")
    lines.append("translation sweep (Baseline warps, fixed image shifted down; mean Dice)")
    lines.append(f"{'method':<18} " + " ".join(f"{shift:>6} px" for shift in SWEEP_SHIFTS))
    for method, values in shifts.items():
        lines.append(f"{method:<18} " + " ".join(f"{values[shift]:9.3f}" for shift in SWEEP_SHIFTS))
    text = "\n".join(lines)
    print(text)
    (RESULTS / "retina.txt").write_text(text + "\n")
    with open(RESULTS / "retina.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = {"CARL": args.carl, "displacement-only": args.unet}
    shipped = set(available_models())
    (RESULTS / "retina.json").write_text(json.dumps({
        "models": names,
        "weights_sha256": {method: model_card(name)["sha256"] if name in shipped else None for method, name in names.items()},
        "date": str(datetime.date.today()),
        "warps_per_image": args.warps,
        "summary": summary,
        "translation_sweep": shifts,
    }, indent=2))
    plot(summary, shifts, models, RESULTS / "retina.png")


if __name__ == "__main__":
    main()
