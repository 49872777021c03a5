"""Known-warp accuracy on a real CT: how far each method's fixed → moving transform lands from
the true one, in millimetres.

Fixed: the TotalSegmentator example CT (``../shared/data/totalsegmentator_examples/example_ct.nii.gz``,
3 mm, 122 × 101 × 112). Moving: the same CT resampled through a known transform T, a translation of
up to ``TRANSLATION_MM`` per axis followed by a smooth B-spline deformation (control points on a
4 × 4 × 4 mesh, displacements of ``DEFORMATION_MM`` standard deviation), on the fixed grid (what T
brings in from outside is air). A moving point x corresponds to the fixed point y = T(x), so the
exact fixed → moving transform sends y to x; the error of a method at x is |φ(y) − x| for its
fixed → moving transform φ, over 2000 random body points (above −500 HU) of the moving image.

Methods: none (the identity), ours (``carlreg.register``, ``--model``), ANTs SyN and Elastix
(``bench/baselines.py``, each with its defaults).

No model here was trained on CT: ``carl-brain-3d`` (the default) learnt brain MR anatomy, so this
measures it far outside its training; a CT model would be passed with ``--model``.

Usage: python bench/known_warp.py [--model NAME_OR_FILE] [--warps 4]
Writes bench/results/known_warp.{txt,csv,json,png}.
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
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CARLRegistration"))
sys.path.insert(0, str(REPO / "bench"))

from baselines import ants_syn, elastix_affine_bspline, versions  # noqa: E402

RESULTS = REPO / "bench" / "results"
CT = REPO.parent / "shared" / "data" / "totalsegmentator_examples" / "example_ct.nii.gz"
METHODS = ("none", "ours", "ants", "elastix")
#: largest translation per axis, and standard deviation of the B-spline displacements (mm)
TRANSLATION_MM, DEFORMATION_MM = 20.0, 4.0
BODY_HU, POINTS, SEED = -500.0, 2000, 2026


def known_transform(fixed: sitk.Image, index: int) -> sitk.Transform:
    """T of warp ``index``: x ↦ B(x + t), moving physical point → fixed physical point (LPS mm)."""
    generator = np.random.default_rng(SEED + index)
    translation = generator.uniform(-TRANSLATION_MM, TRANSLATION_MM, 3)
    deformation = sitk.BSplineTransformInitializer(fixed, [4, 4, 4])
    deformation.SetParameters(generator.normal(0.0, DEFORMATION_MM, len(deformation.GetParameters())).tolist())
    # a composite transform applies its last transform first
    return sitk.CompositeTransform([deformation, sitk.TranslationTransform(3, translation.tolist())])


def make_case(fixed: sitk.Image, index: int, folder: Path):
    """Write the moving image of warp ``index``; return its path and the (moving x, fixed y) point pairs."""
    transform = known_transform(fixed, index)
    moving = sitk.Resample(fixed, fixed, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    path = folder / f"moving{index}.nii.gz"
    sitk.WriteImage(moving, str(path))
    body = np.argwhere(sitk.GetArrayFromImage(moving) > BODY_HU)[:, ::-1]
    chosen = body[np.random.default_rng(SEED).choice(len(body), POINTS, replace=False)]
    x = np.array([moving.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in chosen])
    y = np.array([transform.TransformPoint(p.tolist()) for p in x])
    return path, x, y


def fixed_to_moving(method: str, moving: Path, fixed: Path, model: str, work: Path) -> sitk.Transform:
    if method == "none":
        return sitk.Transform()
    if method == "ours":
        from carlreg.pipeline import register

        return register(str(moving), str(fixed), model, modality="ct", device="cpu").transform
    run = {"ants": ants_syn, "elastix": elastix_affine_bspline}[method]
    _, field = run(moving, fixed, work)
    return sitk.DisplacementFieldTransform(field)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="carl-brain-3d", help="shipped model name, or a weights/checkpoint file")
    parser.add_argument("--warps", type=int, default=4)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    fixed = sitk.Cast(sitk.ReadImage(str(CT)), sitk.sitkFloat32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-known-warp-") as folder:
        folder = Path(folder)
        fixed_path = folder / "fixed.nii.gz"
        sitk.WriteImage(fixed, str(fixed_path))
        for index in range(args.warps):
            moving_path, x, y = make_case(fixed, index, folder)
            for method in METHODS:
                work = folder / f"{method}{index}"
                work.mkdir()
                transform = fixed_to_moving(method, moving_path, fixed_path, args.model, work)
                errors = np.linalg.norm(np.array([transform.TransformPoint(p.tolist()) for p in y]) - x, axis=1)
                rows.append({"warp": index, "method": method, "mean_mm": float(errors.mean()),
                             "p95_mm": float(np.percentile(errors, 95))})
                print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {m: {key: statistics.mean(r[key] for r in rows if r["method"] == m) for key in ("mean_mm", "p95_mm")}
               for m in METHODS}
    for m in METHODS:
        summary[m]["worst_warp_mean_mm"] = max(r["mean_mm"] for r in rows if r["method"] == m)
    lines = [f"# bench/known_warp.py, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, {versions(METHODS)}; "
             f"model {args.model}; {args.warps} known warps of {CT.name} (translation ≤ {TRANSLATION_MM:g} mm per axis, "
             f"B-spline sd {DEFORMATION_MM:g} mm), {POINTS} body points each",
             f"{'method':<8} {'mean error mm':>13} {'p95 error mm':>12} {'worst warp mean mm':>18}"]
    lines += [f"{m:<8} {s['mean_mm']:13.2f} {s['p95_mm']:12.2f} {s['worst_warp_mean_mm']:18.2f}" for m, s in summary.items()]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "known_warp.txt").write_text(text + "\n")
    with open(RESULTS / "known_warp.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / "known_warp.json").write_text(json.dumps({"model": args.model, "date": str(datetime.date.today()),
                                                         "summary": summary, "rows": rows}, indent=2) + "\n")
    plot_errors(rows, args.warps, args.model, RESULTS / "known_warp.png")


def plot_errors(rows: list, warps: int, model: str, path: Path) -> None:
    """Each warp's mean and 95th-percentile error per method, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    for position, method in enumerate(METHODS):
        group = [r for r in rows if r["method"] == method]
        axis.scatter([position - 0.1] * len(group), [r["mean_mm"] for r in group], color="tab:blue",
                     label="mean, per warp" if position == 0 else None)
        axis.scatter([position + 0.1] * len(group), [r["p95_mm"] for r in group], color="tab:orange", marker="^",
                     label="95th percentile, per warp" if position == 0 else None)
    axis.set_yscale("log")
    axis.set_xticks(range(len(METHODS)), METHODS)
    axis.set_ylabel("error vs the known transform (mm)")
    axis.set_title(f"{warps} known warps of a real CT; ours = {model}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    main()
