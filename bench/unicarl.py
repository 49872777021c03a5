"""uniCARL on the CPU: our implementation against the authors' reference, forward time, peak memory, maps.

Same weights (the reference's uniCARL built from a seeded random state, BatchNorm statistics and
U-Net output convolutions randomised so that every step contributes, saved in the authors' file
layout and loaded by each side as its own loader does), same inputs (the real MONAI anatomical pair
from ../shared/data, resized to 160³ and scaled to [0, 1]), CPU, 2 threads, batch 1, float32, and
ours also in bfloat16 (autocast through ``carlreg.inference.predict_maps``; left out on a CPU
without native bfloat16, which the engine refuses). Each run is a fresh
process: one warm-up forward pass (fixed → moving), then ``--repeats`` timed ones (the median is
reported), then the reverse pass once for the map comparison. Peak memory is the process's peak
resident set during the forward passes (Linux ``VmHWM``, reset after the weights are loaded) and
its growth over the resident set before them. Map differences are in voxels of the 160³ grid.

The check of ours at the released input: ours fp32 must equal the reference fp32 within
``TOLERANCE`` (unit frame, both directions, as ``Testing/test_unicarl.py`` checks at 65³), or the
script exits with status 1 after writing its results. The test suite leaves the 160³ forward
passes to this script (CI's CPU would spend over a minute on them).

The reference is ``icon_registration`` 1.1.9 (``icon_registration.unicarl``), built as its
``register.get_model()`` builds it, with stand-in modules for its training-only imports
(``torchvision``, ``footsteps``) where they are not installed; nothing else is patched.

Usage: python bench/unicarl.py [--size 160] [--repeats 3] [--out bench/results/unicarl]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PAIR = ("tiny_fixtures/monai_anatomical_pair/reoriented_anat_moved.nii", "tiny_fixtures/monai_anatomical_pair/anatomical.nii")
RUNS = (("reference", "fp32"), ("ours", "fp32"), ("ours", "bf16"))
THREADS = 2
#: max |map difference| (unit frame) allowed between ours and the reference, both in fp32
TOLERANCE = 1e-5
DIRECTIONS = ("fixed_to_moving", "moving_to_fixed")


def _inputs(size: int):
    """Moving and fixed ``(1, 1, size, size, size)``: resized (trilinear), then scaled to [0, 1]."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    images = []
    for relative in PAIR:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / relative), sitk.sitkFloat32)).astype(np.float32)
        tensor = F.interpolate(torch.from_numpy(array)[None, None], size=[size] * 3, mode="trilinear", align_corners=False)
        images.append((tensor - tensor.min()) / (tensor.max() - tensor.min()))
    return images


def _reference_module():
    """``icon_registration.unicarl.unigradicon_train_parallel``, with stand-ins for its training-only imports."""
    for name in ("torchvision", "footsteps"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
            if name == "torchvision":
                sys.modules["torchvision.utils"] = sys.modules[name].utils = types.ModuleType("torchvision.utils")
    threads = os.environ.get("OMP_NUM_THREADS")
    module = importlib.import_module("icon_registration.unicarl.unigradicon_train_parallel")
    if threads is None:  # its import sets OMP_NUM_THREADS=8 for its training jobs
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = threads
    return module


def _reference_network(size: int):
    """The reference loss model built as ``make_net`` builds it (its ``regis_net`` still the training wrapper)."""
    import torch

    torch.manual_seed(0)
    return _reference_module().make_net(3, [1, 1, size, size, size], equivariantize=False)


def write_weights(size: int, path: str) -> None:
    """Seeded random uniCARL weights in the authors' file layout (keys prefixed ``netPsi.netPsi.``)."""
    import torch

    sys.path.insert(0, str(REPO / "Testing"))
    from reference_oracle import randomise_zero_initialised

    regis_net = _reference_network(size).regis_net
    randomise_zero_initialised(regis_net)
    torch.save(regis_net.state_dict(), path)


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _forward_function(implementation: str, precision: str, size: int, weights: str):
    """A function ``(moving, fixed) -> (1, 3, *S)`` fixed → moving map, loaded as each implementation loads its file."""
    import torch

    if implementation == "reference":
        loss_model = _reference_network(size)
        loss_model.regis_net.load_state_dict(torch.load(weights, weights_only=True))  # as register.get_model()
        loss_model.regis_net = loss_model.regis_net.netPsi.netPsi
        loss_model.assign_identity_map([1, 1, size, size, size])
        loss_model.eval()

        def forward(moving, fixed):
            with torch.no_grad():
                loss_model.identity_map.isIdentity = True
                return loss_model.regis_net(moving, fixed)(loss_model.identity_map)

        return forward
    sys.path.insert(0, str(REPO / "CARLRegistration"))
    from carlreg.inference import predict_maps
    from carlreg.network import build_unicarl, load_unicarl_checkpoint

    model = build_unicarl((size,) * 3)
    load_unicarl_checkpoint(model, torch.load(weights, weights_only=True, mmap=True))
    return lambda moving, fixed: predict_maps(model, moving, fixed, precision=precision).fixed_to_moving


def measure(implementation: str, precision: str, size: int, repeats: int, maps_path: str, weights: str) -> dict:
    """One process's run: warm-up, ``repeats`` timed passes, the reverse pass; saves both maps."""
    import torch

    torch.set_num_threads(THREADS)
    moving, fixed = _inputs(size)
    forward = _forward_function(implementation, precision, size, weights)
    rss_before = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set
    forward(moving, fixed)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fixed_to_moving = forward(moving, fixed)
        seconds.append(time.perf_counter() - start)
    moving_to_fixed = forward(fixed, moving)
    peak = _memory_kib("VmHWM")
    torch.save({"fixed_to_moving": fixed_to_moving.float(), "moving_to_fixed": moving_to_fixed.float()}, maps_path)
    return {
        "implementation": implementation, "precision": precision, "size": size,
        "seconds_median": statistics.median(seconds), "seconds": seconds,
        "peak_rss_gib": peak / 2**20, "rss_growth_gib": (peak - rss_before) / 2**20,
    }


def _differences(maps_path: str, against_path: str, size: int) -> dict:
    """Max |difference| (unit frame and voxels) and 99th percentile (voxels), each direction."""
    import torch

    maps, against = torch.load(maps_path), torch.load(against_path)
    result = {}
    for direction in ("fixed_to_moving", "moving_to_fixed"):
        difference = (maps[direction] - against[direction]).abs()
        voxels = difference * (size - 1)
        result[direction] = {
            "max_unit": float(difference.max()),
            "max_vox": float(voxels.max()),
            "p99_vox": float(torch.quantile(voxels.flatten()[::7].double(), 0.99)),
        }
    return result


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def _table(rows: list, header: str) -> str:
    reference = next(r for r in rows if r["implementation"] == "reference")
    lines = [header, f"{'implementation':>14} {'precision':>9} {'median s':>9} {'speed-up':>8} {'peak GiB':>9} "
             f"{'growth GiB':>10} {'vs reference fp32: max unit / max vox (both directions)':>56} {'vs ours fp32: p99 / max vox':>28}"]
    for r in rows:
        speedup = reference["seconds_median"] / r["seconds_median"]
        vs_ref = r.get("vs_reference")
        ref_text = "-" if vs_ref is None else " / ".join(
            f"{vs_ref[d]['max_unit']:.1e} {vs_ref[d]['max_vox']:.1e}" for d in ("fixed_to_moving", "moving_to_fixed"))
        vs_fp32 = r.get("vs_ours_fp32")
        fp32_text = "-" if vs_fp32 is None else " / ".join(
            f"{vs_fp32[d]['p99_vox']:.3f} {vs_fp32[d]['max_vox']:.3f}" for d in ("fixed_to_moving", "moving_to_fixed"))
        lines.append(f"{r['implementation']:>14} {r['precision']:>9} {r['seconds_median']:9.2f} {speedup:8.2f} "
                     f"{r['peak_rss_gib']:9.2f} {r['rss_growth_gib']:10.2f} {ref_text:>56} {fp32_text:>28}")
    return "\n".join(lines)


def runs_on_this_cpu() -> tuple:
    """``RUNS``, less ours in bf16 where the CPU has no native bfloat16 (the engine refuses it there),
    so that the fp32 comparison and its check still run."""
    import torch

    sys.path.insert(0, str(REPO / "CARLRegistration"))
    from carlreg.device import bf16_supported

    if bf16_supported(torch.device("cpu")):
        return RUNS
    print("this CPU has no native bfloat16: ours in bf16 is left out", file=sys.stderr)
    return tuple(run for run in RUNS if run[1] != "bf16")


def check(rows: list) -> str:
    """The verdict line: whether ours fp32 equals the reference fp32 within ``TOLERANCE`` ("passed" or "FAILED")."""
    ours = next(r for r in rows if (r["implementation"], r["precision"]) == ("ours", "fp32"))
    worst = max(ours["vs_reference"][d]["max_unit"] for d in DIRECTIONS)
    verdict = "passed" if worst <= TOLERANCE else "FAILED"
    return (f"# check {verdict}: ours fp32 vs reference fp32, max |map difference| {worst:.1e} "
            f"(unit frame, both directions), tolerance {TOLERANCE:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "unicarl"), help="writes OUT.txt and OUT.json")
    parser.add_argument("--one", nargs=5, metavar=("IMPL", "PRECISION", "SIZE", "MAPS", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        implementation, precision, size, maps_path, weights = args.one
        print(json.dumps(measure(implementation, precision, int(size), args.repeats, maps_path, weights)))
        return

    import torch

    rows, maps = [], {}
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "unicarl_random.pt")
        write_weights(args.size, weights)
        for implementation, precision in runs_on_this_cpu():
            maps_path = os.path.join(folder, f"{implementation}-{precision}.pt")
            command = [sys.executable, __file__, "--repeats", str(args.repeats),
                       "--one", implementation, precision, str(args.size), maps_path, weights]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            maps[(implementation, precision)] = maps_path
            if implementation != "reference":
                row["vs_reference"] = _differences(maps_path, maps[("reference", "fp32")], args.size)
            if precision == "bf16":
                row["vs_ours_fp32"] = _differences(maps_path, maps[("ours", "fp32")], args.size)
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (
        f"# bench/unicarl.py, {datetime.date.today()}, CPU {cpu_model()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, {THREADS} threads, uniCARL at {args.size}³, batch 1, one direction timed "
        f"(median of {args.repeats} after a warm-up), peak = VmHWM during the passes"
    )
    verdict = check(rows)
    table = _table(rows, header) + "\n" + verdict
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows, "check": verdict}, indent=1) + "\n")
    if "FAILED" in verdict:
        sys.exit(1)


if __name__ == "__main__":
    main()
