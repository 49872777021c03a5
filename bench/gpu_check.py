"""On an NVIDIA GPU: the tests marked ``cuda``, then GPU timings of our CARL against the reference.

For any user with a CUDA device (``make gpu-check``), and for a lent GPU machine, which has no
virtual environment and no ../shared: ``python3 bench/gpu_check.py --carry .gpu-carry --out $OUT``
with the folder made by bench/gpu_carry.py (its packages are unpacked into a temporary folder, its
data replace ../shared/data). The device call:
run(command="python3 bench/gpu_check.py --carry .gpu-carry --out $OUT", carry=[".gpu-carry"], timeout_s=600)

1. ``pytest -m cuda Testing/test_cuda.py`` in a subprocess: OUT/cuda-tests.xml (JUnit) and OUT/cuda-tests.log.
2. Timings, batch 1: each row runs once as a warm-up, then ``--repeats`` times (the median is
   reported), with its peak GPU memory (``torch.cuda.max_memory_allocated``, weights included):
   - forward (the fixed → moving map) of CARL + Ψ3 at 128³ and 175³, ours and the reference with
     the same weights and inputs as bench/forward.py (whose helpers build them), in fp32 (TF32
     off), TF32 and bf16 (autocast); map differences in voxels against the reference in fp32;
   - uniCARL (ours, random weights) at 160³, same precisions, inputs as bench/unicarl.py;
   - the refinement by a velocity field (``carlreg.refine.refine``, default settings: the Slicer
     module's default IO mode) on the MONAI pair, fp32 and TF32 (size: the pair's largest axis);
   - the other IO mode, instance optimization (``carlreg.optimize.instance_optimize``) of CARL +
     Ψ3 at 128³ and 175³, fp32 and TF32: the seconds of ``--io-steps`` steps and the maps, after a
     1-step warm-up. Last, as the costliest rows: on an H100 a 2.5-minute budget ended in them.
   A row that fails (out of memory, say) records its error and the run goes on; rows left when
   ``--budget-minutes`` (default 6.5, tests included) is spent are recorded as skipped, so that a
   run ends within 8 minutes (every row within 3.5 on an H200).
3. OUT/gpu.txt (the table) and OUT/gpu.json (rows, card, torch, CUDA, date), rewritten after each row.

The reference runs its own attention call on the GPU: bench/forward.py's zero-padded values (for
the CPU's flash kernel) are undone; its ban on PyTorch's math kernel stays lifted, which changes
nothing where a fused kernel applies. Without CUDA the script prints one line and writes nothing.

Usage: python bench/gpu_check.py [--out bench/results/gpu] [--carry .gpu-carry] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
#: where Testing/test_cuda.py looks for data first (laid out as ../shared/data)
DATA_VARIABLE = "CARLREG_GPU_DATA"
PRECISIONS = ("fp32", "tf32", "bf16")
FORWARD, UNICARL, INSTANCE_OPTIMIZATION = "forward CARL+psi3", "forward uniCARL", "instance optimization"
REFINEMENT = "svf refinement"
#: the real pair the refinement row registers (laid out as ../shared/data)
REFINEMENT_PAIR = ("tiny_fixtures/monai_anatomical_pair/reoriented_anat_moved.nii", "tiny_fixtures/monai_anatomical_pair/anatomical.nii")


def load_sibling(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (as Testing/conftest.py's load_bench), to reuse its helpers."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def float32_mode(tf32: bool) -> Iterator[None]:
    """Within the block, float32 matrix products and convolutions use TF32 or not (cuDNN's
    default is TF32 on, so an exact float32 comparison must turn it off); restored afterwards."""
    import torch

    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch ≥ 2.9: the legacy flags warn,
        # and reading them after the new ones were set raises
        knobs = [(torch.backends.cuda.matmul, "fp32_precision"), (torch.backends.cudnn.conv, "fp32_precision")]
        value = "tf32" if tf32 else "ieee"
    else:
        knobs, value = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")], tf32
    saved = [getattr(owner, name) for owner, name in knobs]
    for owner, name in knobs:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), before in zip(knobs, saved):
            setattr(owner, name, before)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable, device, repeats: int, warm_up: Optional[Callable] = None) -> dict:
    """Median and all seconds of ``repeats`` calls after one warm-up (``warm_up`` or ``call``),
    the peak GPU memory over them in GiB (None off CUDA), and the last result."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    (warm_up or call)()
    seconds, result = [], None
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        result = call()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": statistics.median(seconds), "seconds_all": seconds, "peak_gib": peak, "result": result}


# --- the environment: carry, engine, data ------------------------------------------------------

def _prepend_path(entry: Path) -> None:
    """``entry`` first on this process's and its children's import path."""
    sys.path.insert(0, str(entry))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(entry), os.environ.get("PYTHONPATH")]))


def prepare(carry: Optional[Path], site: Path) -> Optional[Path]:
    """The engine importable (no install needed), the carry's packages unpacked into ``site``;
    returns the data folder (the carry's, else ../shared/data, else None: random inputs)."""
    _prepend_path(REPO / "CARLRegistration")
    if carry is None:
        return SHARED if SHARED.is_dir() else None
    load_sibling("gpu_carry").unpack_site(carry, site)
    _prepend_path(site)
    os.environ[DATA_VARIABLE] = str((carry / "data").resolve())
    return carry / "data"


def _junit_counts(path: Path) -> dict:
    suite = ElementTree.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def run_cuda_tests(out: Path, timeout_s: float) -> dict:
    """``pytest -m cuda Testing/test_cuda.py``: its return code and counts (OUT/cuda-tests.xml, .log)."""
    junit, log_path = out / "cuda-tests.xml", out / "cuda-tests.log"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}", str(REPO / "Testing" / "test_cuda.py")]
    # deterministic cuBLAS for the exact-resume test (read when CUDA starts in that process)
    environment = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        try:
            completed = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                       timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"returncode": None, "error": f"timed out after {timeout_s:.0f} s"}
    summary = {"returncode": completed.returncode}
    if junit.exists():
        summary.update(_junit_counts(junit))
    return summary


# --- the networks and their inputs ------------------------------------------------------------

def carl_pair(forward: ModuleType, size: int, device) -> Tuple[object, object]:
    """The reference CARL + Ψ3 (bench/forward.py's seeded weights) and ours loaded with its state_dict, on ``device``."""
    import torch.nn.functional as F

    from carlreg import build_carl

    attention = F.scaled_dot_product_attention
    reference = forward._reference_network(size)
    if device.type == "cuda":  # its padding exists for the CPU's flash kernel: the GPU runs the reference's own call
        F.scaled_dot_product_attention = attention
    ours = build_carl(3, (size,) * 3, fourth_step=True)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.to(device).eval(), ours.to(device).eval()


def input_pair(bench: ModuleType, size: int, data: Optional[Path], device) -> Tuple[object, object]:
    """Moving and fixed ``(1, 1, size, size, size)`` from ``bench._inputs`` reading ``data``, or random without data."""
    import torch

    if data is None:
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.rand((1, 1) + (size,) * 3, generator=generator).to(device) for _ in range(2))
    bench.SHARED = data  # the module reads its pair under this folder
    return tuple(image.to(device) for image in bench._inputs(size))


def reference_call(reference, moving, fixed, precision: str) -> Callable:
    """The reference's fixed → moving map on its grid, as bench/forward.py calls it (bf16: under autocast)."""
    import torch

    def call():
        autocast = torch.autocast(moving.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), autocast:
            reference.identity_map.isIdentity = True
            return reference(moving, fixed)(reference.identity_map).float()

    return call


def ours_call(model, moving, fixed, precision: str) -> Callable:
    """Our fixed → moving map through ``carlreg.inference.predict_maps`` (bf16: its autocast)."""
    from carlreg.inference import predict_maps

    engine_precision = "bf16" if precision == "bf16" else "fp32"
    return lambda: predict_maps(model, moving, fixed, precision=engine_precision).fixed_to_moving


# --- rows, results ----------------------------------------------------------------------------

class Measurements:
    """The rows measured so far, written to OUT/gpu.json and OUT/gpu.txt after each one."""

    def __init__(self, out: Path, device, args: argparse.Namespace, deadline: float, meta: dict, scratch: Path) -> None:
        self.out, self.device, self.repeats, self.deadline = out, device, args.repeats, deadline
        self.precisions = tuple(args.precisions)
        self.meta, self.scratch, self.rows = meta, scratch, []
        self.forward = load_sibling("forward")

    def row(self, kind: str, size: int, implementation: str, precision: str, call: Callable,
            warm_up: Optional[Callable] = None, against: Optional[str] = None) -> None:
        """Time ``call`` at ``precision``; its map is kept for later rows and compared with ``against``'s."""
        row = {"kind": kind, "size": size, "implementation": implementation, "precision": precision}
        if time.monotonic() > self.deadline:
            row["error"] = "skipped: time budget spent"
        else:
            try:
                self._measure(row, call, warm_up, against)
            except Exception as err:  # a failed row (out of memory, say) is a result; the run goes on
                row["error"] = _one_line(err)
        self._speedup(row)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def _speedup(self, row: dict) -> None:
        """The reference's seconds (same kind, size and precision) over the row's."""
        for other in self.rows:
            if other["implementation"] == "reference" and other.get("seconds") and row.get("seconds") and all(
                    other[key] == row[key] for key in ("kind", "size", "precision")):
                row["speedup"] = other["seconds"] / row["seconds"]

    def _measure(self, row: dict, call: Callable, warm_up: Optional[Callable], against: Optional[str]) -> None:
        import torch

        with float32_mode(row["precision"] == "tf32"):
            timing = time_call(call, self.device, self.repeats, warm_up)
        result = timing.pop("result")
        row.update(timing)
        maps = getattr(result, "fixed_to_moving", result)
        path = self.scratch / f"{map_key(row['kind'], row['size'], row['implementation'], row['precision'])}.pt"
        torch.save(maps.detach().float().cpu(), path)
        against_path = self.scratch / f"{against}.pt" if against else None
        if against_path is not None and against_path.exists() and against_path != path:
            row["against"] = against
            row["max_diff_vox"], row["p99_diff_vox"] = self.forward._difference_in_voxels(str(path), str(against_path), row["size"])

    def guarded(self, kind: str, size: int, function: Callable, *args) -> object:
        """``function(*args)``, or a row with its error (or the budget's end) if it cannot run."""
        error = "skipped: time budget spent" if time.monotonic() > self.deadline else None
        if error is None:
            try:
                return function(*args)
            except Exception as err:  # building a network failed: recorded, the other measurements go on
                error = _one_line(err)
        self.rows.append({"kind": kind, "size": size, "implementation": "-", "precision": "-", "error": error})
        print(json.dumps(self.rows[-1]), flush=True)
        self.write()
        return None

    def write(self) -> None:
        document = dict(self.meta, rows=self.rows)
        (self.out / "gpu.json").write_text(json.dumps(document, indent=1) + "\n")
        (self.out / "gpu.txt").write_text(table(document) + "\n")


def map_key(kind: str, size: int, implementation: str, precision: str) -> str:
    """The name under which a row's map is kept, for later rows to compare with."""
    return f"{kind}-{size}-{implementation}-{precision}".replace(" ", "_")


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def table(document: dict) -> str:
    """The rows as a text table under a header naming the card, torch, CUDA and the date."""
    tests = document.get("tests", {})
    lines = [
        f"# bench/gpu_check.py, {document['date']}, {document['device']}, torch {document['torch']} (CUDA "
        f"{document['cuda']}), batch 1, one warm-up then the median of {document['repeats']} (instance optimization: "
        f"{document['io_steps']} steps and the maps); peak = torch.cuda.max_memory_allocated of the row",
        f"# tests marked cuda: {json.dumps(tests)}",
        f"{'kind':<22} {'size':>4} {'implementation':>14} {'precision':>9} {'seconds':>8} {'speed-up':>8} "
        f"{'peak GiB':>8} {'max diff vox':>12} {'p99 diff vox':>12}  against / note",
    ]
    for r in document["rows"]:
        number = lambda key, form: format(r[key], form) if r.get(key) is not None else "-"  # noqa: E731
        lines.append(
            f"{r['kind']:<22} {r['size']:>4} {r['implementation']:>14} {r['precision']:>9} {number('seconds', '8.3f'):>8} "
            f"{number('speedup', '8.2f'):>8} {number('peak_gib', '8.2f'):>8} {number('max_diff_vox', '12.2e'):>12} "
            f"{number('p99_diff_vox', '12.2e'):>12}  {r.get('error') or r.get('against', '')}"
        )
    return "\n".join(lines)


# --- the measurements -------------------------------------------------------------------------

def measure_forward(measurements: Measurements, size: int, data: Optional[Path]) -> object:
    """Reference rows, then ours, at ``size`` (one model on the device at a time); returns ours, on the CPU."""
    device, forward = measurements.device, measurements.forward
    reference, ours = carl_pair(forward, size, device)
    moving, fixed = input_pair(forward, size, data, device)
    against = map_key(FORWARD, size, "reference", "fp32")
    for precision in measurements.precisions:
        measurements.row(FORWARD, size, "reference", precision,
                         reference_call(reference, moving, fixed, precision), against=against)
    reference.cpu()
    del reference
    ours.to(device)
    for precision in measurements.precisions:
        measurements.row(FORWARD, size, "ours", precision, ours_call(ours, moving, fixed, precision),
                         against=against)
    return ours.cpu()


def measure_unicarl(measurements: Measurements, size: int, data: Optional[Path]) -> None:
    """uniCARL (random weights) at ``size``³ in each precision, compared with its fp32 maps."""
    from carlreg.network import build_unicarl

    device = measurements.device
    model = build_unicarl((size,) * 3, device=device).eval()
    moving, fixed = input_pair(load_sibling("unicarl"), size, data, device)
    for precision in measurements.precisions:
        measurements.row(UNICARL, size, "ours", precision, ours_call(model, moving, fixed, precision),
                         against=map_key(UNICARL, size, "ours", "fp32"))


def measure_instance_optimization(measurements: Measurements, model, size: int, data: Optional[Path], steps: int) -> None:
    """``steps`` steps of instance optimization (and the maps) after a 1-step warm-up, fp32 and TF32."""
    from carlreg.optimize import instance_optimize

    device = measurements.device
    model.to(device)
    moving, fixed = input_pair(measurements.forward, size, data, device)
    for precision in (p for p in measurements.precisions if p != "bf16"):  # tune() has no autocast
        measurements.row(
            INSTANCE_OPTIMIZATION, size, "ours", precision,
            lambda: instance_optimize(model, moving, fixed, steps=steps),
            warm_up=lambda: instance_optimize(model, moving, fixed, steps=1),
        )
    model.cpu()


def measure_refinement(measurements: Measurements, data: Optional[Path]) -> None:
    """The other IO mode: ``carlreg.refine.refine`` (default settings, from the identity) on the
    MONAI pair, fp32 and TF32; its velocity field is the row's result."""
    import SimpleITK as sitk

    from carlreg.refine import refine

    moving, fixed = (sitk.ReadImage(str((data or SHARED) / path), sitk.sitkFloat32) for path in REFINEMENT_PAIR)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    size = max(fixed.GetSize())
    for precision in (p for p in measurements.precisions if p != "bf16"):
        measurements.row(REFINEMENT, size, "ours", precision,
                         lambda: refine(fixed, moving, identity, device=measurements.device).velocity)


def metadata(device, args: argparse.Namespace, data: Optional[Path]) -> dict:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (rehearsal)"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0], "repeats": args.repeats,
            "io_steps": args.io_steps, "inputs": str(data) if data else "random", "cudnn_benchmark": torch.backends.cudnn.benchmark}


def parse_arguments(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu"), help="folder for gpu.txt, gpu.json, cuda-tests.*")
    parser.add_argument("--carry", help="the folder made by bench/gpu_carry.py (packages and data)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 175], help="CARL forward and instance-optimization sizes")
    parser.add_argument("--unicarl-size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--io-steps", type=int, default=5)
    parser.add_argument("--budget-minutes", type=float, default=6.5, help="rows left after this are skipped")
    parser.add_argument("--skip-tests", action="store_true", help="timings only")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a rehearsal of the code at small sizes
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_arguments(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, cuda available: False); nothing measured")
        return 0
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        data = prepare(Path(args.carry).resolve() if args.carry else None, Path(scratch) / "site")
        device = torch.device(args.device)
        meta = metadata(device, args, data)
        if not args.skip_tests:
            remaining = 60 * args.budget_minutes - (time.monotonic() - started)
            meta["tests"] = run_cuda_tests(out, timeout_s=max(60.0, 0.6 * remaining))
            print(f"gpu-check: tests marked cuda: {json.dumps(meta['tests'])}", flush=True)
        deadline = started + 60 * args.budget_minutes
        measurements = Measurements(out, device, args, deadline, meta, Path(scratch))
        run_all(measurements, args, data)
    print(table(dict(meta, rows=measurements.rows)))
    return 0


def run_all(measurements: Measurements, args: argparse.Namespace, data: Optional[Path]) -> None:
    """Forward at each size, uniCARL, the refinement, then instance optimization at each size."""
    ours = {}
    for size in args.sizes:
        ours[size] = measurements.guarded(FORWARD, size, measure_forward, measurements, size, data)
    measurements.guarded(UNICARL, args.unicarl_size, measure_unicarl, measurements, args.unicarl_size, data)
    measurements.guarded(REFINEMENT, 0, measure_refinement, measurements, data)
    for size in args.sizes:
        if ours.get(size) is not None:
            measurements.guarded(INSTANCE_OPTIMIZATION, size, measure_instance_optimization, measurements,
                                 ours.pop(size), size, data, args.io_steps)


if __name__ == "__main__":
    sys.exit(main())
