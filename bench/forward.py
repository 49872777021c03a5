"""Forward time and peak memory of our CARL engine against the reference implementation.

Same weights (the reference's seeded random CARL + Ψ3, output convolutions randomised so that
every step contributes), same inputs (a real MR pair from ../shared/data resized to each size),
CPU, 2 threads, batch 1, one direction (the fixed → moving map). Each measurement runs in a
fresh process so that its peak RSS is its own. The reference is patched only to run on a CPU:
``.cuda()`` returns the module, and its attention's 4-channel values are zero-padded to the
128 channels of its keys so that PyTorch's CPU flash-attention kernel accepts them.

Usage: python bench/forward.py [--sizes 64 96 128 175] [--out bench/results/forward.csv]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PAIR = ("tiny_fixtures/slicer_mrbraintumor/MRBrainTumor1.nii.gz", "tiny_fixtures/slicer_mrbraintumor/MRBrainTumor2.nii.gz")
RUNS = (("reference", "fp32"), ("ours", "fp32"), ("ours", "bf16"))


def _inputs(size: int):
    import numpy as np
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    images = []
    for relative in PAIR:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / relative), sitk.sitkFloat32)).astype(np.float32)
        tensor = torch.from_numpy(array)[None, None]
        tensor = F.interpolate(tensor / tensor.max(), size=[size] * 3, mode="trilinear", align_corners=False)
        images.append(tensor)
    return images


def _reference_network(size: int):
    import torch

    original_cuda = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        import icon_registration as icon
        import icon_registration.carl as carl

        torch.manual_seed(0)
        model = carl.make_network_final_final([1, 1, size, size, size], 3)
        net = icon.TwoStepRegistration(
            model.regis_net, icon.FunctionFromVectorField(icon.networks.tallUNet2(dimension=3))
        )
        net.assign_identity_map([1, 1, size, size, size])
    finally:
        torch.nn.Module.cuda = original_cuda
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if "lastConv" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    carl.torch.backends.cuda.sdp_kernel = lambda **kwargs: contextlib.nullcontext()
    attention = torch.nn.functional.scaled_dot_product_attention

    def padded_values_attention(query, key, value, **kwargs):
        padded = torch.nn.functional.pad(value, [0, query.shape[-1] - value.shape[-1]])
        return attention(query, key, padded, **kwargs)[..., : value.shape[-1]]

    torch.nn.functional.scaled_dot_product_attention = padded_values_attention
    return net.eval()


def measure(implementation: str, precision: str, size: int, out_path: str, weights: str) -> dict:
    """One timed forward (after nothing else in this process); saves the map to ``out_path``."""
    import torch

    torch.set_num_threads(2)
    moving, fixed = _inputs(size)
    if implementation == "reference":
        reference = _reference_network(size)
        start = time.perf_counter()
        with torch.no_grad():
            reference.identity_map.isIdentity = True
            fixed_to_moving = reference(moving, fixed)(reference.identity_map)
        seconds = time.perf_counter() - start
    else:
        sys.path.insert(0, str(REPO / "CARLRegistration"))
        from carlreg import build_carl
        from carlreg.inference import predict_maps

        model = build_carl(3, (size,) * 3, fourth_step=True)
        model.load_state_dict(torch.load(weights, weights_only=True, mmap=True), strict=True, assign=True)
        start = time.perf_counter()
        fixed_to_moving = predict_maps(model, moving, fixed, precision=precision).fixed_to_moving
        seconds = time.perf_counter() - start
    torch.save(fixed_to_moving, out_path)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"implementation": implementation, "precision": precision, "size": size, "seconds": seconds, "peak_rss_gib": peak_gib}


def _difference_in_voxels(map_path: str, reference_path: str, size: int):
    import torch

    difference = (torch.load(map_path) - torch.load(reference_path)).abs() * (size - 1)
    return float(difference.max()), float(torch.quantile(difference.flatten()[::7].double(), 0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 175])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "forward.csv"))
    parser.add_argument("--one", nargs=5, metavar=("IMPL", "PRECISION", "SIZE", "MAP", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        implementation, precision, size, map_path, weights = args.one
        print(json.dumps(measure(implementation, precision, int(size), map_path, weights)))
        return

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "weights.pt")
        torch.save(_reference_network(min(args.sizes)).state_dict(), weights)
        for size in args.sizes:
            maps = {}
            for implementation, precision in RUNS:
                map_path = os.path.join(folder, f"{implementation}-{precision}-{size}.pt")
                output = subprocess.run(
                    [sys.executable, __file__, "--one", implementation, precision, str(size), map_path, weights],
                    check=True, capture_output=True, text=True,
                ).stdout
                row = json.loads(output.strip().splitlines()[-1])
                maps[(implementation, precision)] = map_path
                if implementation != "reference":
                    row["max_diff_vox"], row["p99_diff_vox"] = _difference_in_voxels(
                        map_path, maps[("reference", "fp32")], size
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
    header = (
        f"# bench/forward.py, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, 2 threads, CARL+Ψ3, batch 1, one direction"
    )
    print(header)
    print(f"{'size':>5} {'implementation':>14} {'precision':>9} {'seconds':>8} {'peak GiB':>9} {'speed-up':>8} {'max diff vox':>12} {'p99 diff vox':>12}")
    reference_seconds = {r["size"]: r["seconds"] for r in rows if r["implementation"] == "reference"}
    for r in rows:
        r["speedup"] = reference_seconds[r["size"]] / r["seconds"]
        diff = f"{r['max_diff_vox']:12.2e} {r['p99_diff_vox']:12.2e}" if "max_diff_vox" in r else f"{'-':>12} {'-':>12}"
        print(f"{r['size']:>5} {r['implementation']:>14} {r['precision']:>9} {r['seconds']:8.1f} {r['peak_rss_gib']:9.2f} {r['speedup']:8.2f} {diff}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        handle.write(header + "\n")
        writer = csv.DictWriter(handle, fieldnames=list(rows[-1].keys()))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
