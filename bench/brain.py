"""Brain registration on the untouched test subjects: ours (without and with instance
optimization) against ANTs SyN and Elastix, on the same pairs, machine and run.

Pairs: SynthSeg label maps of subjects 19 and 20 (never used in training or validation), both
directions. Each is reoriented to RAS and resampled (nearest) to 2 mm on a 128³ box around its
own centre, so the two images of a pair have different fields of view; an image is synthesised
from each with a shared random contrast (seed fixed), as in training. Figures: mean Dice over
brain structures (labels below 100 present in the fixed map), % of fixed voxels where the
transform folds (Jacobian determinant ≤ 0, one formula for all methods:
``carlreg.geometry.jacobian_determinant`` of the fixed → moving displacement field), wall time
and peak memory (resident set) of a fresh process per run.

- none: the identity in physical space.
- ours: ``carlreg.register`` with a model (default ``carl-brain-3d``); ours_svf: with the
  refinement by a velocity field (``io_mode="svf"``, default settings; ours_svf_4mm: its finest
  level at 4 mm, ``--refine-spacing 4``); ours_io: with the paper's
  instance optimization of the weights (``io_mode="network"``, ``--io-steps``); ours_cover: with
  the network's box grown to hold both images beyond the box the model was trained on
  (``network_box="cover"``).
- displacement_only: the same with the displacement-only network trained the same way
  (``--unet-model``, default ``unet-brain-3d``; the paper's variant 1).
- ANTs SyN and Elastix (affine + B-spline), each with its defaults (``bench/baselines.py``); the
  labels are warped by each tool itself (nearest neighbour).

The translation sweep (``--sweep``, the paper's Fig. 4): pair 19 → 20 with the fixed image (grid
and content) moved so that the brains' centroids coincide, then its content shifted by 0, 10, …,
60 mm along each axis within its grid (what leaves the field of view is lost, as a scan placed
differently would lose it); ours, the displacement-only network trained the same way
(``--unet-model``), ANTs and Elastix (``--methods`` also takes ours_cover). Dice and folding.
``--split``: the same offsets with each image's content moved by half of it, in opposite
directions (neither nears its grid's edge): what the offset costs, apart from where the content sits.
``--together``: both images' content moved by the shift, no offset between them: what where the
content sits costs, apart from the offset (a translation-equivariant network on an unbounded
grid would not move; the rows at small shifts are also the sweep's noise floor).
``--uncut`` (with any placement): each shifted image's grid grown by the shift on both sides, so
that nothing leaves its field of view and the content still lies the shift away from its grid's
centre: the offset and the content's place, apart from what a cut loses (ours_cover grows the
network's box with the grid; ours keeps the trained box, which may cut the content).

Usage: python bench/brain.py [--model NAME_OR_FILE] [--unet-model ...] [--io-steps 50] [--methods none,ours,ours_cover,ours_svf,ours_svf_4mm,ours_io,displacement_only,ants,elastix] [--background dark|random]
       python bench/brain.py --sweep [--split | --together] [--uncut] [--model ...] [--unet-model ...] [--methods ...] [--keep none,ants,elastix] [--output brain_sweep]
Writes bench/results/brain.{txt,csv,json,png}, or brain_sweep.{txt,csv,png} (brain_sweep_split with --split,
brain_sweep_together with --together; _uncut appended with --uncut).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CARLRegistration"))
sys.path.insert(0, str(REPO / "bench"))

from baselines import ants_syn, elastix_affine_bspline, versions  # noqa: E402
from carlreg.data import BACKGROUNDS, BRAIN_LABEL_LIMIT, SPLITS, label_map_image, random_contrast, synthesize_image  # noqa: E402
from carlreg.geometry import jacobian_determinant  # noqa: E402
from carlreg.metrics import dice_per_label, mean_dice  # noqa: E402
from carlreg.refine import RefineSettings  # noqa: E402
from carlreg.registry import available_models, model_card  # noqa: E402

RESULTS = REPO / "bench" / "results"
LABEL_MAPS = REPO.parent / "shared" / "data" / "synthseg_label_maps"
SHAPE, SPACING_MM = (128, 128, 128), 2.0
METHODS = ("none", "ours", "ours_cover", "ours_svf", "ours_svf_4mm", "ours_io", "displacement_only", "ants", "elastix")
#: the accuracy table's methods by default (bench/results/brain.json, whose figures the brain
#: models' cards carry); the refinement's table: --methods none,ours,ours_svf,ours_svf_4mm,ants,elastix --output brain_refine
DEFAULT_METHODS = ("none", "ours", "ours_io", "displacement_only", "ants", "elastix")
#: the instance-optimization mode of each of our methods (register()'s io_mode)
IO_MODES = {"ours_svf": "svf", "ours_svf_4mm": "svf", "ours_io": "network"}
#: the refinement's settings of each svf method: the default (finest level 2 mm), or a coarser
#: finest level (4 mm: levels of 16, 8 and 4 mm), faster
REFINE_SETTINGS = {"ours_svf": RefineSettings(), "ours_svf_4mm": RefineSettings(spacing_mm=4.0)}
#: our methods whose network box grows beyond the one it was trained on (register()'s network_box)
COVER_METHODS = ("ours_cover",)
OUR_METHODS = ("ours", "ours_cover", "ours_svf", "ours_svf_4mm", "ours_io", "displacement_only")
#: the test set's name in the result JSON and the model cards
TEST_SET = "subjects 19-20"
#: the translation sweep: shifts of the fixed image's content (mm) along each axis, methods
SWEEP_SHIFTS_MM = (0, 10, 20, 30, 40, 50, 60)
SWEEP_METHODS = ("none", "ours", "displacement_only", "ants", "elastix")
AXES = {"x (L→R)": 0, "y (P→A)": 1, "z (I→S)": 2}
SEED = 2026
#: the deep grey structures, both sides (thalamus, caudate, putamen, pallidum, hippocampus, amygdala,
#: accumbens, ventral DC; FreeSurfer's labels): what a registration driven by the head's outline misses
DEEP_GREY = (10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60)


def make_pairs(folder: Path, shift_mm=None, background: str = "dark", moving_shift_mm=None, subjects=SPLITS["test"],
               uncut: bool = False) -> list:
    """Write the test images and label maps to ``folder``: ``[(moving, fixed), ...]`` of
    ``{"image": path, "labels": path, "subject": n}``. With ``shift_mm`` (x, y, z, LPS; the
    translation sweep) the fixed image's content is first moved so that the two brains'
    centroids coincide (its origin moved: no resampling), then its content by ``shift_mm`` within its grid;
    with ``moving_shift_mm`` the moving image's content too, within its own grid. ``uncut``: each
    shifted image's grid is grown by the shift on both sides (:func:`_shifted`).
    ``background``: the synthesised background (``carlreg.data.BACKGROUNDS``); ``subjects``: the
    two label maps (default: the test pair; bench/checkpoints.py takes validation subjects)."""
    label_maps = {s: label_map_image(LABEL_MAPS / f"training_seg_{s:02d}.nii.gz", SHAPE, SPACING_MM) for s in subjects}
    tensors = {s: torch.from_numpy(sitk.GetArrayFromImage(m).astype(np.int64)) for s, m in label_maps.items()}
    intensities = random_contrast(max(int(t.max()) for t in tensors.values()), torch.Generator().manual_seed(SEED), background)
    files = {}
    for index, subject in enumerate(subjects):
        labels = label_maps[subject]
        generator = torch.Generator().manual_seed(SEED + index)
        image = sitk.GetImageFromArray(synthesize_image(tensors[subject], generator, intensities, background)[0, 0].numpy())
        image.CopyInformation(labels)
        files[subject] = {"image": folder / f"{subject}_image.nii.gz", "labels": folder / f"{subject}_labels.nii.gz",
                          "subject": subject, "sitk": (image, labels)}
    pairs = []
    for moving, fixed in ((subjects[0], subjects[1]), (subjects[1], subjects[0])):
        pair = []
        for role, subject in (("moving", moving), ("fixed", fixed)):
            image, labels = files[subject]["sitk"]
            if role == "fixed" and shift_mm is not None:
                offset = _brain_centroid(files[moving]["sitk"][1]) - _brain_centroid(labels)
                image, labels = _moved_grid(image, offset), _moved_grid(labels, offset)
                image, labels = _shifted(image, shift_mm, uncut), _shifted(labels, shift_mm, uncut)
            if role == "moving" and moving_shift_mm is not None:
                image, labels = _shifted(image, moving_shift_mm, uncut), _shifted(labels, moving_shift_mm, uncut)
            paths = {"image": folder / f"{role}{moving}-{fixed}_image.nii.gz",
                     "labels": folder / f"{role}{moving}-{fixed}_labels.nii.gz", "subject": subject}
            sitk.WriteImage(image, str(paths["image"]))
            sitk.WriteImage(labels, str(paths["labels"]))
            pair.append(paths)
        pairs.append(tuple(pair))
    return pairs


def _brain_centroid(labels: sitk.Image) -> np.ndarray:
    """Physical (LPS) centroid of the brain structures of a label map."""
    array = sitk.GetArrayViewFromImage(labels)
    index = np.argwhere((array > 0) & (array < BRAIN_LABEL_LIMIT)).mean(axis=0)[::-1]
    return np.array(labels.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def _moved_grid(image: sitk.Image, offset_mm) -> sitk.Image:
    """The same voxels on a grid moved by ``offset_mm`` (LPS)."""
    moved = sitk.Image(image)
    moved.SetOrigin(tuple(np.add(image.GetOrigin(), offset_mm)))
    return moved


def _shifted(image: sitk.Image, shift_mm, uncut: bool = False) -> sitk.Image:
    """The content moved by ``shift_mm`` (LPS) within the same grid (what leaves is lost), or with
    ``uncut`` on that grid grown by the shift (whole voxels) on both sides: nothing is lost, and the
    grid's centre stays where it was."""
    grid = image
    if uncut:
        along_index = np.asarray(image.GetDirection()).reshape(3, 3).T @ np.asarray(shift_mm, float) / image.GetSpacing()
        grow = [int(math.ceil(abs(v) - 1e-6)) for v in along_index]
        grid = sitk.ConstantPad(image, grow, grow, 0)
    interpolator = sitk.sitkNearestNeighbor if image.GetPixelID() == sitk.sitkInt32 else sitk.sitkLinear
    return sitk.Resample(image, grid, sitk.TranslationTransform(3, [-float(s) for s in shift_mm]), interpolator, 0)


def _dice(warped_labels: sitk.Image, fixed_labels: sitk.Image) -> dict:
    """Mean Dice over the fixed map's brain structures (``dice``) and over its deep grey ones (``dice_deep``)."""
    warped = torch.from_numpy(sitk.GetArrayFromImage(warped_labels).astype(np.int64))
    fixed = torch.from_numpy(sitk.GetArrayFromImage(fixed_labels).astype(np.int64))
    deep = dice_per_label(warped, fixed, [v for v in DEEP_GREY if bool((fixed == v).any())])
    return {"dice": mean_dice(warped, fixed, BRAIN_LABEL_LIMIT),
            "dice_deep": statistics.mean(deep.values()) if deep else float("nan")}


def _folding(field: sitk.Image) -> float:
    return 100.0 * float((sitk.GetArrayFromImage(jacobian_determinant(field)) <= 0).mean())


def _identity_field(fixed: sitk.Image) -> sitk.Image:
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64)
    field.CopyInformation(fixed)
    return field


def run_one(method: str, moving: dict, fixed: dict, model: str, io_steps: int, work: Path) -> dict:
    """One registration: Dice, folding %, seconds (excluding reading the files)."""
    moving_image, fixed_image = sitk.ReadImage(str(moving["image"])), sitk.ReadImage(str(fixed["image"]))
    moving_labels, fixed_labels = sitk.ReadImage(str(moving["labels"])), sitk.ReadImage(str(fixed["labels"]))
    started = time.perf_counter()
    if method == "none":
        warped = sitk.Resample(moving_labels, fixed_labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        field = _identity_field(fixed_image)
    elif method in OUR_METHODS:
        from carlreg.pipeline import register

        result = register(moving_image, fixed_image, model, modality="max", device="cpu",
                          io_mode=IO_MODES.get(method, "none"), io_steps=io_steps, moving_labels=moving_labels,
                          refine_settings=REFINE_SETTINGS.get(method, RefineSettings()),
                          network_box="cover" if method in COVER_METHODS else "trained")
        warped, field = result.warped_labels, result.transform.GetDisplacementField()
    elif method in ("ants", "elastix"):
        run = ants_syn if method == "ants" else elastix_affine_bspline
        warp, field = run(Path(moving["image"]), Path(fixed["image"]), work)
        warped = warp(Path(moving["labels"]), True)
    else:
        raise ValueError(f"run_one(): method must be one of {METHODS}, got {method!r}")
    seconds = time.perf_counter() - started
    return {**_dice(warped, fixed_labels), "folding_percent": _folding(field), "seconds": seconds}


def run_in_fresh_process(method: str, moving: dict, fixed: dict, model: str, io_steps: int) -> dict:
    """``run_one`` in a child process, for its own peak memory, with a scratch folder for the
    tools' files."""
    with tempfile.TemporaryDirectory(prefix="bench-brain-") as work:
        command = [sys.executable, str(Path(__file__).resolve()), "--one", method, "--pair",
                   json.dumps([str(moving["image"]), str(moving["labels"]), str(fixed["image"]), str(fixed["labels"])]),
                   "--model", model, "--io-steps", str(io_steps), "--work", work]
        completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"bench/brain.py: {method} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


#: the sweep's methods whose figures do not depend on our weights (``--keep``)
PEER_METHODS = ("none", "ants", "elastix")


def _row_numbers(row: dict) -> dict:
    """A sweep CSV row with its figures as numbers (the CSV holds text; a figure its run did not
    measure, such as ``dice_deep`` before it existed, is left out)."""
    return {key: value if key in ("axis", "method") else int(value) if key == "shift_mm" else float(value)
            for key, value in row.items() if value != ""}


def kept_rows(output: str, methods) -> tuple:
    """The rows of ``methods`` (of :data:`PEER_METHODS`) from the committed ``<output>.csv``, with
    the date its table states: a new model reruns its own rows only (ANTs and Elastix take most of
    the sweep's hour, and their figures do not depend on our weights)."""
    if not set(methods) <= set(PEER_METHODS):
        raise SystemExit(f"bench/brain.py --keep: only {', '.join(PEER_METHODS)} (their figures do not depend on our "
                         f"weights), got {', '.join(methods)}")
    with open(RESULTS / f"{output}.csv", newline="") as handle:
        rows = [_row_numbers(row) for row in csv.DictReader(handle) if row["method"] in methods]
    expected = len(methods) * len(AXES) * len(SWEEP_SHIFTS_MM)
    if len(rows) != expected:
        raise SystemExit(f"bench/brain.py --keep: expected {expected} rows of {', '.join(methods)} in {output}.csv, found {len(rows)}")
    header = (RESULTS / f"{output}.txt").read_text().splitlines()[0]
    # rows kept once already were measured on the date that run named, not on its own
    date = header.split("from the run of ")[1] if "from the run of " in header else header.split(", ")[1]
    return rows, date


#: where a sweep step moves the content (:func:`placement_shifts`), and what the sweep's header says of it
PLACEMENT_NOTES = {"fixed": "", "split": "; split: the fixed content moved by +half the shift, the moving by −half",
                   "together": "; together: both contents moved by the shift, no offset between them"}
PLACEMENTS = tuple(PLACEMENT_NOTES)
UNCUT_NOTE = "; uncut: each shifted grid grown by the shift on both sides, no content lost"


def placement_shifts(shift_lps, placement: str) -> tuple:
    """The fixed and the moving content's shifts (LPS mm; the moving's None: in place) of a sweep
    step of ``shift_lps``: the fixed content by all of it (``fixed``), each by half of it in
    opposite directions (``split``), or both by all of it, no offset between them (``together``)."""
    if placement == "fixed":
        return list(shift_lps), None
    if placement == "split":
        half = [s / 2 for s in shift_lps]
        return half, [-s for s in half]
    if placement == "together":
        return list(shift_lps), list(shift_lps)
    raise ValueError(f"placement_shifts(): placement must be one of {PLACEMENTS}, got {placement!r}")


def sweep_shift(axis: int, shift_mm: float) -> list:
    """The sweep's shift of ``shift_mm`` along ``axis`` (0, 1, 2: x, y, z) towards R, A or S, in LPS mm."""
    shift = [0.0, 0.0, 0.0]
    # positive RAS directions: x and y flip between RAS and LPS
    shift[axis] = float(shift_mm) * (-1.0 if axis < 2 else 1.0)
    return shift


def sweep(model: str, unet_model: str, methods, output: str, keep=(), placement: str = "fixed", uncut: bool = False) -> None:
    """Dice against the fixed image's shift along each axis (the paper's Fig. 4), pair 19 → 20;
    the rows of the ``keep`` methods are the committed ones (:func:`kept_rows`). ``placement``
    (:func:`placement_shifts`): ``split`` gives the same offsets with neither content near its
    grid's edge as the fixed one nears it; ``together`` moves both contents, no offset. ``uncut``:
    the shifted grids grown so that no content is lost (:func:`_shifted`)."""
    rows, kept_date = kept_rows(output, keep) if keep else ([], "")
    for axis_name, axis in AXES.items():
        for shift in SWEEP_SHIFTS_MM:
            fixed_shift, moving_shift = placement_shifts(sweep_shift(axis, shift), placement)
            with tempfile.TemporaryDirectory(prefix="bench-brain-sweep-") as folder:
                moving, fixed = make_pairs(Path(folder), fixed_shift, moving_shift_mm=moving_shift, uncut=uncut)[0]
                for method in methods:
                    chosen = unet_model if method == "displacement_only" else model
                    figures = run_in_fresh_process(method, moving, fixed, chosen, 0)
                    rows.append({"axis": axis_name, "shift_mm": shift, "method": method, **figures})
                    print(json.dumps(rows[-1]), file=sys.stderr)
    kept = f"; rows of {', '.join(keep)} from the run of {kept_date}" if keep else ""
    kept += PLACEMENT_NOTES[placement] + (UNCUT_NOTE if uncut else "")
    header = (f"# bench/brain.py --sweep, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
              f"{versions(methods)}; ")
    methods = [method for method in METHODS if method in methods or method in keep]
    lines = [header + f"ours {model}, displacement-only {unet_model}; pair 19 → 20, mean Dice of brain structures{kept}",
             f"{'axis':<9} {'method':<18} " + " ".join(f"{s:>5}mm" for s in SWEEP_SHIFTS_MM)]
    for key, title in (("dice", None), ("folding_percent", "folding % (Jacobian determinant ≤ 0)")):
        if title:
            lines.append(f"{title}:")
        for axis_name in AXES:
            for method in methods:
                values = [r[key] for r in rows if r["axis"] == axis_name and r["method"] == method]
                lines.append(f"{axis_name:<9} {method:<18} " + " ".join(f"{v:7.3f}" for v in values))
    text = "\n".join(lines)
    print(text)
    (RESULTS / f"{output}.txt").write_text(text + "\n")
    with open(RESULTS / f"{output}.csv", "w", newline="") as handle:
        # kept rows may lack a figure that the new ones have
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 3.8), sharey=True)
    for plot_axis, axis_name in zip(axes, AXES):
        for method in methods:
            values = [r["dice"] for r in rows if r["axis"] == axis_name and r["method"] == method]
            plot_axis.plot(SWEEP_SHIFTS_MM, values, "o-", label=method)
        plot_axis.set_title(f"{placement}{' uncut' if uncut else ''} shifted along {axis_name}")
        plot_axis.set_xlabel("shift (mm)")
    axes[0].set_ylabel("mean Dice, brain structures")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{output}.png", dpi=80)
    plt.close(figure)


def summarise(rows: list, methods) -> dict:
    """Each method's mean figures over its rows (and the Dice's sd, the number of pairs), under
    the test set's name: ``{method: {TEST_SET: figures}}``, as brain.json and the cards hold them."""
    summary = {}
    for method in methods:
        group = [r for r in rows if r["method"] == method]
        figures = {key: statistics.mean(r[key] for r in group) for key in ("dice", "folding_percent", "seconds", "peak_rss_gib")}
        figures.update(dice_sd=statistics.stdev(r["dice"] for r in group), pairs=len(group))
        summary[method] = {TEST_SET: figures}
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="carl-brain-3d", help="shipped model name, or a weights/checkpoint file")
    parser.add_argument("--io-steps", type=int, default=50)
    parser.add_argument("--methods", default="", help=f"comma-separated, of {METHODS} (sweep: {SWEEP_METHODS})")
    parser.add_argument("--output", default="", help="result file stem in bench/results (brain, or brain_sweep)")
    parser.add_argument("--sweep", action="store_true", help="the translation sweep instead of the accuracy table")
    parser.add_argument("--keep", default="", help=f"sweep: comma-separated, of {PEER_METHODS}: their rows are the committed ones")
    parser.add_argument("--unet-model", default="unet-brain-3d", help="the displacement-only network (sweep)")
    placement = parser.add_mutually_exclusive_group()
    placement.add_argument("--split", dest="placement", action="store_const", const="split",
                           help="sweep: each image's content moved by half the offset, in opposite directions")
    placement.add_argument("--together", dest="placement", action="store_const", const="together",
                           help="sweep: both images' content moved by the shift, no offset between them")
    parser.set_defaults(placement="fixed")  # neither flag: only the fixed content moves
    parser.add_argument("--uncut", action="store_true",
                        help="sweep: each shifted image's grid grown by the shift on both sides, so that no content leaves it")
    parser.add_argument("--background", default="dark", choices=BACKGROUNDS,
                        help="the test images' synthesised background (accuracy table)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(2)
    if args.one:
        moving_image, moving_labels, fixed_image, fixed_labels = json.loads(args.pair)
        figures = run_one(args.one, {"image": moving_image, "labels": moving_labels}, {"image": fixed_image, "labels": fixed_labels},
                          args.model, args.io_steps, Path(args.work))
        figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(figures))
        return
    if args.sweep:
        keep = [m for m in args.keep.split(",") if m]
        methods = [m for m in (args.methods or ",".join(SWEEP_METHODS)).split(",") if m and m not in keep]
        default_output = "brain_sweep" + ("" if args.placement == "fixed" else f"_{args.placement}") + ("_uncut" if args.uncut else "")
        sweep(args.model, args.unet_model, methods, args.output or default_output, keep, args.placement, args.uncut)
        return
    accuracy_table(args, [m for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m], args.output or "brain")


def accuracy_table(args: argparse.Namespace, methods: list, output: str) -> None:
    """Every method on the test pairs (both directions), each run in a fresh process; the table
    written to ``bench/results/<output>``.{txt,csv,json,png}."""
    names = {method: args.unet_model if method == "displacement_only" else args.model
             for method in methods if method in OUR_METHODS}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-brain-data-") as folder:
        for moving, fixed in make_pairs(Path(folder), background=args.background):
            for method in methods:
                figures = run_in_fresh_process(method, moving, fixed, names.get(method, args.model), args.io_steps)
                rows.append({"method": method, "moving": moving["subject"], "fixed": fixed["subject"], **figures})
                print(json.dumps(rows[-1]), file=sys.stderr)
    header = (f"# bench/brain.py, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, {versions(methods)}; "
              f"model {args.model}, displacement-only {args.unet_model}, IO {args.io_steps} steps; "
              f"subjects {SPLITS['test']} both directions, 2 mm, 128³, {args.background} background")
    lines = [header, f"{'method':<17} {'Dice':>6} {'sd':>6} {'folding %':>9} {'seconds':>8} {'peak GiB':>8}"]
    summary = summarise(rows, methods)
    for method in methods:
        figures = summary[method][TEST_SET]
        lines.append(f"{method:<17} {figures['dice']:6.3f} {figures['dice_sd']:6.3f} {figures['folding_percent']:9.3f} "
                     f"{figures['seconds']:8.1f} {figures['peak_rss_gib']:8.2f}")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{output}.txt").write_text(text + "\n")
    with open(RESULTS / f"{output}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shipped = set(available_models())
    (RESULTS / f"{output}.json").write_text(json.dumps({
        "models": names,
        "weights_sha256": {method: model_card(name)["sha256"] if name in shipped else None for method, name in names.items()},
        "io_steps": args.io_steps,
        "background": args.background,
        "date": str(datetime.date.today()),
        "summary": summary,
        "rows": rows,
    }, indent=2) + "\n")
    plot_table(summary, RESULTS / f"{output}.png")


def plot_table(summary: dict, path: Path) -> None:
    """Mean Dice (± sd) per method, with its time per pair written on the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    figures = [summary[m][TEST_SET] for m in methods]
    figure, axis = plt.subplots(figsize=(7, 3.8))
    bars = axis.bar(range(len(methods)), [f["dice"] for f in figures], yerr=[f["dice_sd"] for f in figures], capsize=4)
    for bar, f in zip(bars, figures):
        axis.text(bar.get_x() + bar.get_width() / 2, 0.01, f"{f['seconds']:.1f} s", ha="center", va="bottom", fontsize=8,
                  color="white")
    axis.set_xticks(range(len(methods)), [m.replace("_", "\n") for m in methods], fontsize=8)
    axis.set_ylabel("mean Dice, brain structures")
    axis.set_title(f"subjects 19 ↔ 20 ({figures[0]['pairs']} pairs, no pre-alignment); time per pair on the bars", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    main()
