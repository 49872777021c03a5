"""Command line: ``carl-register``, ``carl-warp``, ``carl-train`` and ``python -m carlreg <command>``.

Each subcommand calls the public API and turns its progress reports into a bar on a
terminal (``--progress bar``), JSON lines on stdout (``--progress json``: ``stage``, ``step``,
``total``, ``fraction``, ``eta_s``, ``message``) or nothing.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Callable, List, Optional

from .progress import Cancelled, Progress

__all__ = ["main", "register_main", "warp_main", "train_main"]


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


def _cancel_on_sigterm() -> None:
    """SIGTERM (a GUI's Cancel) raises Cancelled, so that partial outputs are removed on the way out."""

    def cancelled(signum, frame):
        raise Cancelled("cancelled")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, cancelled)


def _torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(prog: str, body: Callable[[], None]) -> int:
    """Run a command's body: 0 on success, 130 when cancelled, 2 with a one-line error otherwise."""
    try:
        body()
    except Cancelled as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 130
    except ImportError as err:
        print(f"{prog}: {_import_problem(err)}", file=sys.stderr)
        return 3
    except (ValueError, OSError, RuntimeError) as err:
        print(f"{prog}: {(str(err).splitlines() or [type(err).__name__])[0]}", file=sys.stderr)
        return 2
    return 0


def _import_problem(err: ImportError) -> str:
    """One line on a missing or broken dependency, with what to do."""
    text = str(err)
    if "numpy" in text.lower():
        return (
            "PyTorch cannot load with the installed NumPy (a PyTorch built for NumPy 1.x under NumPy 2): "
            "install a newer PyTorch (in Slicer: PyTorch Utils, reinstall) or NumPy < 2"
        )
    if getattr(err, "name", None) == "torch" or "torch" in text:
        return "PyTorch is not installed: in Slicer install the PyTorch extension; elsewhere `pip install torch`"
    return text.splitlines()[0] if text else type(err).__name__


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
        train(config, resolve_device(device), progress_printer(args.progress), max_steps_this_run=args.max_steps)

    return _run("carl-train", body)


def _register_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carl-register", description="Register a moving image to a fixed image with CARL.")
    parser.add_argument("--moving", required=True, help="moving image (file SimpleITK reads, or DICOM folder)")
    parser.add_argument("--fixed", required=True, help="fixed image")
    parser.add_argument("--out-transform", required=True, help="fixed → moving transform: .h5/.tfm or a field image .nii.gz/.nrrd/.mha (LPS)")
    parser.add_argument("--out-warped", help="moving image resampled onto the fixed grid")
    parser.add_argument("--out-inverse", help="moving → fixed transform (second pass, images swapped)")
    parser.add_argument("--out-jacobian", help="Jacobian determinant image of the fixed → moving map")
    parser.add_argument("--moving-labels", help="label map on the moving image, to warp")
    parser.add_argument("--out-warped-labels", help="where to write the warped moving label map")
    parser.add_argument("--fixed-labels", help="label map on the fixed image, for Dice")
    parser.add_argument("--fixed-landmarks", help="landmarks on the fixed image (.fcsv, .mrk.json, .csv), for the TRE")
    parser.add_argument("--moving-landmarks", help="the corresponding landmarks on the moving image")
    parser.add_argument("--landmarks-coordinate-system", choices=["RAS", "LPS"], help="coordinate system of CSV landmarks")
    parser.add_argument("--model", required=True, help="shipped model name or weights file")
    parser.add_argument("--modality", choices=["auto", "ct", "mr", "max"], default="auto")
    parser.add_argument("--io-steps", type=int, default=0, help="instance-optimization steps (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--field-spacing", type=float, help="transform grid spacing in mm (default: the fixed image's)")
    parser.add_argument("--summary", help="write the metrics as JSON")
    parser.add_argument("--report", help="write a report PNG (needs matplotlib)")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar" if sys.stderr.isatty() else "none")
    return parser


def register_main(argv: Optional[List[str]] = None) -> int:
    """``carl-register``: exit 0 on success, 2 on bad input, 3 on a missing dependency (one line
    on stderr), 130 when cancelled."""
    args = _register_parser().parse_args(argv)
    _cancel_on_sigterm()
    metrics = {}

    def body() -> None:
        import SimpleITK as sitk

        from .io import atomic_outputs, check_outputs, read_image, write_image, write_transform
        from .pipeline import register, warp_image

        if args.out_warped_labels and not args.moving_labels:
            raise ValueError("--out-warped-labels needs --moving-labels")
        inputs = [args.moving, args.fixed, args.moving_labels, args.fixed_labels, args.model,
                  args.fixed_landmarks, args.moving_landmarks]
        outputs = [args.out_transform, args.out_warped, args.out_inverse, args.out_jacobian,
                   args.out_warped_labels, args.summary, args.report]
        check_outputs(outputs, inputs)
        moving, fixed = read_image(args.moving, "moving image"), read_image(args.fixed, "fixed image")
        result = register(
            moving, fixed, args.model, modality=args.modality, io_steps=args.io_steps,
            device=args.device, inverse=bool(args.out_inverse), progress=progress_printer(args.progress),
            field_spacing_mm=args.field_spacing, precision=args.precision,
            moving_labels=args.moving_labels, fixed_labels=args.fixed_labels,
            fixed_landmarks=args.fixed_landmarks, moving_landmarks=args.moving_landmarks,
            landmarks_coordinate_system=args.landmarks_coordinate_system,
        )
        with atomic_outputs() as reserve:
            write_transform(result.transform, reserve(args.out_transform))
            if args.out_inverse:
                write_transform(result.inverse_transform, reserve(args.out_inverse))
            if args.out_warped:
                write_image(result.warped, reserve(args.out_warped))
            if args.out_jacobian:
                write_image(result.jacobian, reserve(args.out_jacobian))
            if args.out_warped_labels:
                write_image(result.warped_labels, reserve(args.out_warped_labels))
            if args.summary:
                reserve(args.summary).write_text(json.dumps(result.metrics, indent=2))
            if args.report:
                from .report import write_report

                identity = sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity)
                write_report(
                    reserve(args.report), fixed, warp_image(moving, fixed, identity), result.warped,
                    result.transform.GetDisplacementField(), result.jacobian, result.metrics,
                )
        metrics.update(result.metrics)

    code = _run("carl-register", body)
    if code == 0 and args.progress == "json":
        print(json.dumps({"stage": "done", "metrics": metrics}), flush=True)
    return code


def warp_main(argv: Optional[List[str]] = None) -> int:
    """``carl-warp --transform T --input I --reference R --out O [--labels]``."""
    from .io import atomic_output, check_outputs, read_image, read_transform, write_image
    from .pipeline import warp_image

    parser = argparse.ArgumentParser(prog="carl-warp", description="Apply a saved transform to an image or label map.")
    parser.add_argument("--transform", required=True, help="fixed → moving transform written by carl-register")
    parser.add_argument("--input", required=True, help="image or label map in the moving space")
    parser.add_argument("--reference", required=True, help="image whose grid the output takes (the fixed image)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--labels", action="store_true", help="nearest-neighbour interpolation, pixel type kept")
    args = parser.parse_args(argv)

    def body() -> None:
        check_outputs([args.out], [args.transform, args.input, args.reference])
        transform = read_transform(args.transform)
        warped = warp_image(read_image(args.input, "input"), read_image(args.reference, "reference"), transform, args.labels)
        with atomic_output(args.out) as temporary:
            write_image(warped, temporary)

    return _run("carl-warp", body)


def demo_main(argv: Optional[List[str]] = None) -> int:
    """``python -m carlreg demo [--model M] [--out FOLDER]``: make the demo pair (:mod:`carlreg.demo`),
    register it, and say where the results are."""
    parser = argparse.ArgumentParser(prog="carlreg demo", description="Register the demo pair (MNI152 and a moved, deformed copy).")
    parser.add_argument("--model", default="carl-brain-3d", help="shipped model name or weights file")
    parser.add_argument("--out", default="demo-output", help="folder for the pair and the results")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar" if sys.stderr.isatty() else "none")
    args = parser.parse_args(argv)
    from pathlib import Path

    out = Path(args.out)
    pair: List[Path] = []

    def body() -> None:
        from .demo import make_demo_pair
        from .registry import model_card

        if not Path(args.model).exists():
            model_card(args.model)  # an unknown model fails here, before any file is written
        marker = out / ".carlreg-demo"
        if out.exists() and any(out.iterdir()) and not marker.exists():
            raise ValueError(f"{out} holds other files: give the demo a new or empty folder (--out)")
        pair.extend(make_demo_pair(out))
        marker.touch()

    code = _run("carlreg demo", body)
    if code:
        return code
    results = {"transform": out / "fixed_to_moving.h5", "warped": out / "warped.nii.gz",
               "report": out / "report.png", "summary": out / "summary.json"}
    code = register_main([
        "--moving", str(pair[0]), "--fixed", str(pair[1]), "--model", args.model, "--modality", "mr",
        "--device", args.device, "--progress", args.progress, "--out-transform", str(results["transform"]),
        "--out-warped", str(results["warped"]), "--report", str(results["report"]), "--summary", str(results["summary"]),
    ])
    if code == 0:
        metrics = json.loads(results["summary"].read_text())
        print(f"Registered {pair[0]} (moved 40 mm, deformed) to {pair[1]} in {metrics['seconds']:.1f} s on "
              f"{metrics['device']}: LNCC {metrics['lncc_before']:.3f} -> {metrics['lncc_after']:.3f}, "
              f"{metrics['folding_percent']:.2f} % folding.")
        for what, path in results.items():
            print(f"  {what:<9} {path}")
    return code


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m carlreg <subcommand> ...``."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"register": register_main, "warp": warp_main, "train": train_main, "demo": demo_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m carlreg {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
