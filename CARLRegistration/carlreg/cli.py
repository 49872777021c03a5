"""Command line of registration: ``carl-register``, ``carl-warp``, ``python -m carlreg.cli <command>``.

``python -m carlreg`` (:mod:`carlreg.__main__`) adds ``train`` (:mod:`carlreg.train_cli`) and
``demo`` (:mod:`carlreg.demo`); the Slicer module's worker runs ``python -m carlreg.cli register``.

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
from typing import Callable, Dict, List, Optional, Tuple

from .progress import Cancelled, Progress

__all__ = ["main", "register_main", "warp_main", "models_main", "progress_printer", "run_command"]


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


def run_command(prog: str, body: Callable[[], None]) -> int:
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


def _register_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carl-register", description="Register a moving image to a fixed image with CARL.")
    # required unless --list-models (checked in register_main, with a one-line error)
    parser.add_argument("--moving", help="moving image (file SimpleITK reads, or DICOM folder); required")
    parser.add_argument("--fixed", help="fixed image; required")
    parser.add_argument("--out-transform", help="fixed → moving transform: .h5/.tfm or a field image .nii.gz/.nrrd/.mha (LPS); required")
    parser.add_argument("--out-warped", help="moving image resampled onto the fixed grid")
    parser.add_argument("--out-inverse", help="moving → fixed transform, on the moving grid (see --inverse-method)")
    parser.add_argument(
        "--inverse-method", choices=["exact", "network"], default="exact",
        help="exact (default): the numerical inverse of the fixed → moving field, by fixed-point iteration "
             "started from the network's reverse pass; network: the reverse pass (images swapped) as is, "
             "only approximately inverse",
    )
    parser.add_argument("--out-affine", help="the fixed → moving transform split into its affine part and a residual "
                                             "field: an ITK composite transform file (.h5/.tfm), the affine first")
    parser.add_argument("--out-jacobian", help="Jacobian determinant image of the fixed → moving map")
    parser.add_argument("--moving-labels", help="label map on the moving image, to warp")
    parser.add_argument("--out-warped-labels", help="where to write the warped moving label map")
    parser.add_argument("--fixed-labels", help="label map on the fixed image, for Dice")
    parser.add_argument("--fixed-landmarks", help="landmarks on the fixed image (.fcsv, .mrk.json, .csv), for the TRE")
    parser.add_argument("--moving-landmarks", help="the corresponding landmarks on the moving image")
    parser.add_argument("--landmarks-coordinate-system", choices=["RAS", "LPS"], help="coordinate system of CSV landmarks")
    parser.add_argument("--model", help="shipped model name or weights file (default: carl-brain-3d for 3-D images)")
    parser.add_argument("--list-models", action="store_true", help="list the shipped models and exit")
    parser.add_argument("--modality", choices=["auto", "ct", "mr", "max"], default="auto")
    parser.add_argument(
        "--io-mode", choices=["none", "svf", "network"], default="none",
        help="instance optimization: none (default); svf: the network's map refined at the images' resolution by a "
             "stationary velocity field (any model); network: the paper's, the network's weights tuned on the pair",
    )
    parser.add_argument("--io-steps", type=int, default=50, help="--io-mode network: tuning steps (default 50)")
    parser.add_argument("--refine-spacing", type=float,
                        help="--io-mode svf: the finest level's grid spacing in mm (default 2)")
    parser.add_argument("--refine-regularization", type=float,
                        help="--io-mode svf: weight of the velocity's smoothness (default 1)")
    parser.add_argument("--network-box", choices=["trained", "cover"], default="trained",
                        help="run the network on the box the model was trained on (default), or grow it to hold "
                             "both images, up to twice its input shape (more capture range, may fold in the background)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--field-spacing", type=float, help="transform grid spacing in mm (default: the fixed image's)")
    parser.add_argument("--field-extent", choices=["fixed", "both"], default="fixed",
                        help="the transform's grid covers the fixed image (default) or both images' extents")
    parser.add_argument("--summary", help="write the metrics as JSON")
    parser.add_argument("--report", help="write a report PNG (needs matplotlib)")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar" if sys.stderr.isatty() else "none")
    return parser


def _refine_settings(args: argparse.Namespace):
    """The refinement's settings: the defaults, with what the command line gave."""
    from .refine import RefineSettings

    given = {"spacing_mm": args.refine_spacing, "regularization": args.refine_regularization}
    return RefineSettings(**{name: value for name, value in given.items() if value is not None})


def _write_register_outputs(args: argparse.Namespace, result, moving, fixed) -> None:
    """Every output file ``carl-register`` was asked for, all or none (:func:`carlreg.io.atomic_outputs`)."""
    import SimpleITK as sitk

    from .io import atomic_outputs, write_image, write_transform
    from .pipeline import warp_image

    with atomic_outputs() as reserve:
        write_transform(result.transform, reserve(args.out_transform))
        if args.out_inverse:
            write_transform(result.inverse_transform, reserve(args.out_inverse))
        if args.out_affine:
            from .affine import decompose

            sitk.WriteTransform(decompose(result.transform.GetDisplacementField()), str(reserve(args.out_affine)))
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


def register_main(argv: Optional[List[str]] = None) -> int:
    """``carl-register``: exit 0 on success, 2 on bad input, 3 on a missing dependency (one line
    on stderr), 130 when cancelled."""
    args = _register_parser().parse_args(argv)
    if args.list_models:
        return models_main([])
    missing = [flag for flag, value in (("--moving", args.moving), ("--fixed", args.fixed), ("--out-transform", args.out_transform)) if not value]
    if missing:
        print(f"carl-register: missing {', '.join(missing)} (carl-register --help lists the options)", file=sys.stderr)
        return 2
    _cancel_on_sigterm()
    metrics = {}

    def body() -> None:
        from .io import check_outputs, read_image
        from .pipeline import register

        if args.out_warped_labels and not args.moving_labels:
            raise ValueError("--out-warped-labels needs --moving-labels")
        if args.out_affine and not args.out_affine.lower().endswith((".h5", ".tfm")):
            raise ValueError(f"--out-affine expects an ITK transform file (.h5 or .tfm), got {args.out_affine}")
        inputs = [args.moving, args.fixed, args.moving_labels, args.fixed_labels, args.model,
                  args.fixed_landmarks, args.moving_landmarks]
        outputs = [args.out_transform, args.out_warped, args.out_inverse, args.out_affine, args.out_jacobian,
                   args.out_warped_labels, args.summary, args.report]
        check_outputs(outputs, inputs)
        moving, fixed = read_image(args.moving, "moving image"), read_image(args.fixed, "fixed image")
        model = args.model
        if model is None:
            from .registry import default_model

            model = default_model(fixed.GetDimension())
            print(f"carl-register: no --model given: using {model}, the default for "
                  f"{fixed.GetDimension()}-D images (--list-models shows the others)", file=sys.stderr)
        result = register(
            moving, fixed, model, modality=args.modality, io_mode=args.io_mode, io_steps=args.io_steps,
            refine_settings=_refine_settings(args),
            device=args.device, inverse=bool(args.out_inverse), inverse_method=args.inverse_method,
            progress=progress_printer(args.progress),
            field_spacing_mm=args.field_spacing, field_extent=args.field_extent, precision=args.precision,
            network_box=args.network_box, moving_labels=args.moving_labels, fixed_labels=args.fixed_labels,
            fixed_landmarks=args.fixed_landmarks, moving_landmarks=args.moving_landmarks,
            landmarks_coordinate_system=args.landmarks_coordinate_system,
        )
        _write_register_outputs(args, result, moving, fixed)
        metrics.update(result.metrics)

    code = run_command("carl-register", body)
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

    return run_command("carl-warp", body)


def models_main(argv: Optional[List[str]] = None) -> int:
    """``python -m carlreg models`` (also ``carl-register --list-models``): the shipped models, a row each."""
    argparse.ArgumentParser(prog="carlreg models", description="List the shipped models.").parse_args(argv)
    from .registry import DEFAULT_MODELS, describe_models

    rows = describe_models()
    if not rows:
        print("carlreg models: no models are installed", file=sys.stderr)
        return 2
    columns = ["name", "dimension", "input", "modality", "weights", "title"]
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in columns[:-1]}
    print("  ".join(column.upper().ljust(widths.get(column, 0)) for column in columns).rstrip())
    for row in rows:
        print("  ".join(row[column].ljust(widths.get(column, 0)) for column in columns).rstrip())
    defaults = ", ".join(f"{name} for {dimension}-D images" for dimension, name in sorted(DEFAULT_MODELS.items()))
    print(f"default without --model: {defaults}")
    return 0


#: the subcommands of ``python -m carlreg.cli`` and what each does: what registration needs, and
#: all the Slicer extension ships (``python -m carlreg`` adds training and the demo)
COMMANDS = {
    "register": (register_main, "register a moving image to a fixed image (carl-register)"),
    "warp": (warp_main, "apply a saved transform to an image or label map (carl-warp)"),
    "models": (models_main, "list the shipped models"),
}


def main(argv: Optional[List[str]] = None, commands: Optional[Dict[str, Tuple[Callable[[List[str]], int], str]]] = None,
         prog: str = "python -m carlreg.cli") -> int:
    """``python -m carlreg[.cli] <command> ...``: the command's own options follow it (``<command> --help``)."""
    commands = commands or COMMANDS
    parser = argparse.ArgumentParser(
        prog=prog, description="CARL registration from the command line.",
        epilog="commands:\n" + "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in commands.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(commands), metavar="command", help="one of: " + ", ".join(commands))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's options (<command> --help)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.error(f"name a command: {', '.join(commands)} (--help says what each does)")
    args = parser.parse_args(argv)
    return commands[args.command][0](args.arguments)


if __name__ == "__main__":
    sys.exit(main())
