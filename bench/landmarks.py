"""Real MR with expert landmarks: the ICBM 2009a template registered to MNI152NLin6Asym, scored
with their AFIDs (anatomical fiducials), by ours (without and with each IO mode), ANTs SyN and
Elastix, on the same machine and run.

Pair: moving = the ICBM 2009a symmetric T1 (nilearn's copy), fixed = MNI152NLin6Asym (antspy's
``mni.nii.gz``, 1 mm, 182×218×182), both in ``../shared/data/brain_templates``. Landmarks: the
32 AFIDs of ``tpl-MNI152NLin6Asym`` on the fixed image and of ``tpl-MNI152NLin2009cSym`` on the
moving one (placed on the 2009c image, so approximate on 2009a, by about 1.2 mm: the floor of any
method). With ``--offsets`` the moving image and its landmarks are moved (the image's origin: no
resampling) along x, y and z by each offset / √3 each (default 0 and 60 mm in all).

Figures per run, each run in a fresh process: TRE (mean, median, max; mm) of the fixed → moving
transform at the fixed landmarks, % of fixed voxels where it folds (Jacobian determinant ≤ 0, one
formula for all: ``carlreg.geometry.jacobian_determinant``), wall time (files read beforehand
excluded) and peak memory (resident set) of the process.

- none: the identity in physical space.
- ours: ``carlreg.register`` with ``--model`` (default ``carl-brain-3d``); ours_svf: with the
  refinement by a velocity field (``io_mode="svf"``, default settings; ours_svf_4mm: its finest
  level at 4 mm, ``--refine-spacing 4``); ours_io: with the paper's
  instance optimization of the weights (``io_mode="network"``, ``--io-steps``; slow: run only at
  the first offset).
- ants, elastix: ANTs SyN and Elastix affine + B-spline with their defaults (``bench/baselines.py``).

Usage: python bench/landmarks.py [--methods ...] [--offsets 0,60] [--io-steps 50] [--output landmarks]
Writes bench/results/landmarks.{txt,json} (or the ``--output`` stem).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
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
from carlreg.geometry import jacobian_determinant  # noqa: E402
from carlreg.landmarks import Landmarks, read_landmarks, target_registration_error  # noqa: E402

RESULTS = REPO / "bench" / "results"
TEMPLATES = REPO.parent / "shared" / "data" / "brain_templates"
MOVING = TEMPLATES / "nilearn" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
FIXED = TEMPLATES / "antspy" / "mni.nii.gz"
MOVING_AFIDS = TEMPLATES / "afids" / "tpl-MNI152NLin2009cSym_afids.fcsv"
FIXED_AFIDS = TEMPLATES / "afids" / "tpl-MNI152NLin6Asym_afids.fcsv"
METHODS = ("none", "ours", "ours_svf", "ours_svf_4mm", "ours_io", "ants", "elastix")
IO_MODES = {"ours_svf": "svf", "ours_svf_4mm": "svf", "ours_io": "network"}
#: the refinement's finest level: 2 mm (the default) or 4 mm (faster, coarser)
REFINE_SPACING_MM = {"ours_svf": 2.0, "ours_svf_4mm": 4.0}
#: methods too slow to run at every offset: only at the first
FIRST_OFFSET_ONLY = ("ours_io",)


def offset_vector(offset_mm: float) -> np.ndarray:
    """The moving image's displacement (LPS mm) for an offset: equal parts along x, y and z."""
    return np.full(3, offset_mm / math.sqrt(3.0))


def moved_moving_image(offset_mm: float, folder: Path) -> Path:
    """The moving template with its origin moved by the offset, written into ``folder``."""
    image = sitk.ReadImage(str(MOVING))
    image.SetOrigin((np.array(image.GetOrigin()) + offset_vector(offset_mm)).tolist())
    path = folder / f"moving_{offset_mm:g}mm.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def moved_landmarks(offset_mm: float) -> Landmarks:
    """The moving AFIDs moved with the image."""
    landmarks = read_landmarks(MOVING_AFIDS)
    return Landmarks(landmarks.labels, landmarks.points_lps + offset_vector(offset_mm))


def _field(method: str, moving: Path, model: str, io_steps: int, work: Path) -> sitk.Image:
    """The fixed → moving displacement field (LPS mm, fixed grid) of one method."""
    if method == "none":
        fixed = sitk.ReadImage(str(FIXED))
        field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64)
        field.CopyInformation(fixed)
        return field
    if method in ("ours", "ours_svf", "ours_svf_4mm", "ours_io"):
        from carlreg.pipeline import register
        from carlreg.refine import RefineSettings

        result = register(str(moving), str(FIXED), model, device="cpu", io_mode=IO_MODES.get(method, "none"),
                          io_steps=io_steps, refine_settings=RefineSettings(spacing_mm=REFINE_SPACING_MM.get(method, 2.0)))
        return result.transform.GetDisplacementField()
    if method in ("ants", "elastix"):
        run = ants_syn if method == "ants" else elastix_affine_bspline
        return run(moving, FIXED, work)[1]
    raise ValueError(f"bench/landmarks.py: method must be one of {METHODS}, got {method!r}")


def run_one(method: str, offset_mm: float, moving: Path, model: str, io_steps: int, work: Path) -> dict:
    """One registration: TRE, folding %, seconds."""
    started = time.perf_counter()
    field = _field(method, moving, model, io_steps, work)
    seconds = time.perf_counter() - started
    folding = 100.0 * float((sitk.GetArrayFromImage(jacobian_determinant(field)) <= 0).mean())
    # a copy: a field taken from a transform that is gone crashes a new transform's TransformPoint
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    tre = target_registration_error(transform, read_landmarks(FIXED_AFIDS), moved_landmarks(offset_mm))
    return {"tre_mean_mm": tre["tre_after_mean_mm"], "tre_median_mm": tre["tre_after_median_mm"],
            "tre_max_mm": tre["tre_after_max_mm"], "tre_before_mm": tre["tre_before_mean_mm"],
            "folding_percent": folding, "seconds": seconds}


def run_in_fresh_process(method: str, offset_mm: float, moving: Path, model: str, io_steps: int) -> dict:
    """``run_one`` in a child process, for its own peak memory, with a scratch folder."""
    with tempfile.TemporaryDirectory(prefix="bench-landmarks-") as work:
        command = [sys.executable, str(Path(__file__).resolve()), "--one", method, "--offset", str(offset_mm),
                   "--moving", str(moving), "--model", model, "--io-steps", str(io_steps), "--work", work]
        completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"bench/landmarks.py: {method} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def table(rows: list, header: str) -> str:
    """The result table: a line per method and offset."""
    width = max(len("method"), *(len(r["method"]) for r in rows))
    lines = [header, f"{'method':<{width}} {'offset mm':>9} {'TRE mean':>8} {'median':>7} {'max':>6} {'folding %':>9} "
                     f"{'seconds':>8} {'peak GiB':>8}"]
    for r in rows:
        lines.append(f"{r['method']:<{width}} {r['offset_mm']:9.0f} {r['tre_mean_mm']:8.2f} {r['tre_median_mm']:7.2f} "
                     f"{r['tre_max_mm']:6.2f} {r['folding_percent']:9.4f} {r['seconds']:8.1f} {r['peak_rss_gib']:8.2f}")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="carl-brain-3d", help="shipped model name, or a weights file")
    parser.add_argument("--io-steps", type=int, default=50, help="ours_io: the network's tuning steps")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--offsets", default="0,60", help="comma-separated offsets of the moving image, mm")
    parser.add_argument("--output", default="landmarks", help="result file stem in bench/results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--moving", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.one:
        figures = run_one(args.one, args.offset, Path(args.moving), args.model, args.io_steps, Path(args.work))
        figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(figures))
        return
    methods = [m for m in args.methods.split(",") if m]
    offsets = [float(o) for o in args.offsets.split(",") if o]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-landmarks-data-") as folder:
        for index, offset in enumerate(offsets):
            moving = moved_moving_image(offset, Path(folder))
            for method in methods:
                if index and method in FIRST_OFFSET_ONLY:
                    continue
                figures = run_in_fresh_process(method, offset, moving, args.model, args.io_steps)
                rows.append({"method": method, "offset_mm": offset, **figures})
                print(json.dumps(rows[-1]), file=sys.stderr)
    header = (f"# bench/landmarks.py, {datetime.date.today()}, {_cpu()}, {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} threads, {versions(methods)}; model {args.model}, IO {args.io_steps} steps; "
              f"ICBM 2009a → MNI152NLin6Asym, 32 AFIDs")
    text = table(rows, header)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.txt").write_text(text + "\n")
    (RESULTS / f"{args.output}.json").write_text(json.dumps({
        "date": str(datetime.date.today()), "cpu": _cpu(), "model": args.model, "io_steps": args.io_steps,
        "versions": versions(methods), "rows": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
