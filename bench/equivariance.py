"""Is the trained CARL equivariant to translations? Measured on a real test pair, network by network.

CARL's claim (paper §4, eq. 10 and 15): if the fixed image's content moves by ``u``, the map
moves with it, ``φ'(x) = φ(x − u)``. The engine's tests check this where it is exact by
construction (``Testing/test_equivariance.py``); for a trained Ξ it holds only as far as the
features are unaffected by the shift and the attention is concentrated. This script measures it.

Pair 19 → 20 of ``bench/brain.py`` (the sweep's construction at 0 mm: the brains' centroids
coincide), brought to each model's input shape (``carlreg.register`` runs a network on the larger box it
was trained on, where its edge is farther; here the edge effects show within 60 mm). The fixed image's
content is then shifted within its box by k whole attention voxels (4 input voxels, 12 mm at the
models' 3 mm) along each axis, zeros entering, and for each network and stage (the first step
alone, the whole network) the error is |φ'(x) − φ(x − u)| in mm over the fixed brain voxels.
A map that ignored the shift would err by the shift itself; an equivariant one by 0.

Also, for CARL: how similar Ξ's features of a brain voxel stay when the content moves (mean
cosine, 1 = unaffected), how concentrated its attention is (median over the fixed brain voxels
of the spread of the attended moving positions, mm, and of the effective number of keys,
exp(entropy)), and the same errors with the images' background (outside the head) set to zero,
which makes the box's zero padding indistinguishable from the background.

Usage: python bench/equivariance.py [--model carl-brain-3d] [--unet-model unet-brain-3d] [--output equivariance]
Writes bench/results/equivariance.{txt,csv,json,png} (or the ``--output`` stem).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CARLRegistration"))
sys.path.insert(0, str(REPO / "bench"))

from brain import make_pairs  # noqa: E402
from carlreg.data import BRAIN_LABEL_LIMIT  # noqa: E402
from carlreg.geometry import canonical_orientation, network_ratios, to_network  # noqa: E402
from carlreg.io import image_to_tensor  # noqa: E402
from carlreg.maps import identity_map  # noqa: E402
from carlreg.models import load_model  # noqa: E402
from carlreg.network import AttentionRegistration, Down, TwoStep  # noqa: E402
from carlreg.pipeline import network_input  # noqa: E402

RESULTS = REPO / "bench" / "results"
#: shifts in attention voxels (4 input voxels each: Ξ runs at a quarter of the resolution)
SHIFTS = (1, 2, 3, 4, 5)
AXES = {"z (I→S)": 0, "y (P→A)": 1, "x (L→R)": 2}
BACKGROUNDS = ("as is", "zeroed")


def first_step(network: torch.nn.Module):
    """The first step of a ``final_final`` CARL (``TwoStep{Down{TwoStep{Down{first}, Ψ1}}, Ψ2}``)
    and the pooling that brings full-resolution inputs to its caller's resolution."""
    if not (isinstance(network, TwoStep) and isinstance(network.netPhi, Down)
            and isinstance(network.netPhi.net, TwoStep) and isinstance(network.netPhi.net.netPhi, Down)):
        raise ValueError(f"first_step(): expected a final_final CARL network, got {type(network).__name__}")
    return network.netPhi.net.netPhi, network.netPhi._pool


def maps(network: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> dict:
    """``{"first step": coords, "whole network": coords}``: ``(1, 3, *S)`` fixed → moving maps,
    unit frame, tensor order, the first step's on its own grid (a quarter of the resolution:
    a shift of 4 input voxels is exactly one voxel there), the whole network's on the input grid."""
    step, pool = first_step(network)
    quarter_moving, quarter_fixed = pool(pool(moving)), pool(pool(fixed))
    with torch.no_grad():
        first = step.net.transform(quarter_moving, quarter_fixed).on_grid(identity_map(quarter_fixed.shape[2:]))
        return {"first step": first, "whole network": network.transform(moving, fixed).on_grid(identity_map(fixed.shape[2:]))}


def shifted(tensor: torch.Tensor, axis: int, voxels: int) -> torch.Tensor:
    """Content moved by ``voxels`` (> 0) along spatial ``axis`` (tensor order) within the box; zeros enter."""
    out = torch.zeros_like(tensor)
    dim = 2 + axis
    out.narrow(dim, voxels, tensor.shape[dim] - voxels).copy_(tensor.narrow(dim, 0, tensor.shape[dim] - voxels))
    return out


def equivariance_error_mm(original: torch.Tensor, moved: torch.Tensor, mask: torch.Tensor, axis: int, voxels: int,
                          unit_mm: torch.Tensor) -> np.ndarray:
    """|φ'(x) − φ(x − u)| in mm at the brain voxels ``x − u`` of ``mask`` that stay in the box
    (maps and mask on one grid, ``voxels`` of it; ``unit_mm``: mm per unit along each axis)."""
    dim, n = 2 + axis, original.shape[2 + axis]
    before = original.narrow(dim, 0, n - voxels)
    after = moved.narrow(dim, voxels, n - voxels)
    inside = mask.narrow(dim, 0, n - voxels)[0, 0]
    scale = unit_mm.view(3, 1)
    difference = (after - before)[0][:, inside] * scale
    return difference.norm(dim=0).numpy()


def brain_mask(labels: sitk.Image, shape, spacing_mm: float, head: bool = False) -> torch.Tensor:
    """``(1, 1, *shape)`` bool: the brain (or with ``head`` the whole head) on the network grid."""
    array = image_to_tensor(labels)
    inside = (array > 0) if head else ((array > 0) & (array < BRAIN_LABEL_LIMIT))
    return to_network(inside.float(), shape, network_ratios(labels, shape, spacing_mm)) > 0.5


def attention_figures(attention: AttentionRegistration, moving: torch.Tensor, fixed: torch.Tensor,
                      mask: torch.Tensor, unit_mm: torch.Tensor) -> dict:
    """Median over the fixed brain voxels (attention grid) of the attended positions' spread (mm)
    and of the effective number of keys; ``moving``/``fixed`` at the attention grid's resolution."""
    shape = list(fixed.shape[2:])
    padding = attention.padding
    crop = (slice(None), slice(None)) + (slice(padding, -padding),) * 3
    with torch.no_grad():
        keys = attention.featurize(moving)[0].flatten(1).T
        queries = attention.featurize(fixed)[crop][0].flatten(1).T[mask.flatten()]
        positions = attention.padded_grid_coordinates(shape, "cpu")[0].flatten(1).T
        positions = positions * unit_mm
        spreads, effective = [], []
        for chunk in queries.split(512):
            weights = torch.softmax(chunk @ keys.T, dim=1)
            mean = weights @ positions
            spreads.append(torch.sqrt((weights @ positions**2 - mean**2).sum(1).clamp_min(0)))
            effective.append(torch.exp(-(weights * torch.log(weights.clamp_min(1e-30))).sum(1)))
    return {"attention_spread_mm": float(torch.cat(spreads).median()),
            "attention_effective_keys": float(torch.cat(effective).median())}


def fixed_features(attention: AttentionRegistration, image: torch.Tensor) -> torch.Tensor:
    """Ξ's ``(1, C, *m)`` features of an image at the attention grid's resolution, the padding cropped."""
    crop = (slice(None), slice(None)) + (slice(attention.padding, -attention.padding),) * 3
    with torch.no_grad():
        return attention.featurize(image)[crop]


def feature_cosine(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor, axis: int, voxels: int) -> float:
    """Mean cosine between the features (:func:`fixed_features`) of the fixed brain voxels before
    and after the shift (attention grid; ``voxels`` in attention voxels)."""
    dim, n = 2 + axis, before.shape[2 + axis]
    before, after = before.narrow(dim, 0, n - voxels), after.narrow(dim, voxels, n - voxels)
    inside = mask.narrow(dim, 0, n - voxels)[0, 0]
    cosine = (before * after).sum(1)[0] / (before.norm(dim=1)[0] * after.norm(dim=1)[0]).clamp_min(1e-12)
    return float(cosine[inside].mean())


def measure(name: str, kind: str, moving_files: dict, fixed_files: dict) -> tuple:
    """Rows of errors for one network (``kind``: ours or displacement_only), and CARL's attention figures."""
    network = load_model(name, "cpu")
    shape = tuple(int(n) for n in network.input_shape)
    spacing_mm = network.input_spacing_mm
    images = {}
    for role, files in (("moving", moving_files), ("fixed", fixed_files)):
        image = canonical_orientation(sitk.ReadImage(str(files["image"])))
        labels = canonical_orientation(sitk.ReadImage(str(files["labels"])))
        images[role] = {"image": network_input(image, "max", shape, spacing_mm, f"{role} image"),
                        "brain": brain_mask(labels, shape, spacing_mm),
                        "head": brain_mask(labels, shape, spacing_mm, head=True)}
    step, pool = first_step(network)
    attention = getattr(getattr(step, "net", None), "net", None)
    unit_mm = torch.tensor([(n - 1) * spacing_mm for n in shape])
    brain = {"whole network": images["fixed"]["brain"], "first step": pool(pool(images["fixed"]["brain"].float())) > 0.5}
    extra = {"background_intensity": float(images["fixed"]["image"][~images["fixed"]["head"]].mean())}
    rows = []
    is_carl = isinstance(attention, AttentionRegistration)
    for background in BACKGROUNDS if is_carl else BACKGROUNDS[:1]:
        moving, fixed = images["moving"]["image"], images["fixed"]["image"]
        if background == "zeroed":
            moving, fixed = moving * images["moving"]["head"], fixed * images["fixed"]["head"]
        original = maps(network, moving, fixed)
        if is_carl:
            extra[background] = attention_figures(attention, pool(pool(moving)), pool(pool(fixed)), brain["first step"], unit_mm)
            features = fixed_features(attention, pool(pool(fixed)))
        for axis_name, axis in AXES.items():
            for k in SHIFTS:
                voxels = 4 * k
                moved_fixed = shifted(fixed, axis, voxels)
                moved = maps(network, moving, moved_fixed)
                for stage in original:
                    errors = equivariance_error_mm(original[stage], moved[stage], brain[stage], axis,
                                                   k if stage == "first step" else voxels, unit_mm)
                    row = {"network": kind, "model": name, "stage": stage, "background": background, "axis": axis_name,
                           "shift_mm": voxels * spacing_mm, "median_error_mm": float(np.median(errors)),
                           "p95_error_mm": float(np.percentile(errors, 95))}
                    if stage == "first step" and is_carl:
                        row["feature_cosine"] = feature_cosine(features, fixed_features(attention, pool(pool(moved_fixed))),
                                                               brain["first step"], axis, k)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    return rows, extra


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="carl-brain-3d", help="CARL: shipped model name or weights file")
    parser.add_argument("--unet-model", default="unet-brain-3d", help="the displacement-only network")
    parser.add_argument("--output", default="equivariance", help="result file stem in bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="bench-equivariance-") as folder:
        moving, fixed = make_pairs(Path(folder), [0.0, 0.0, 0.0])[0]
        ours, extra = measure(args.model, "ours", moving, fixed)
        unet, _ = measure(args.unet_model, "displacement_only", moving, fixed)
    rows = ours + unet
    shifts_mm = sorted({r["shift_mm"] for r in rows})
    lines = [f"# bench/equivariance.py, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}; ours {args.model}, displacement-only {args.unet_model}; pair 19 → 20; "
             f"median |φ'(x) − φ(x − u)| (mm) over the fixed brain, fixed content shifted by u",
             f"{'network':<18} {'stage':<14} {'background':<10} {'axis':<9} "
             + " ".join(f"{s:>5.0f}mm" for s in shifts_mm) + "   feature cosine"]
    for row_key in sorted({(r["network"], r["stage"], r["background"], r["axis"]) for r in rows},
                          key=lambda k: (k[0] != "ours", k[1], k[2], list(AXES).index(k[3]))):
        group = sorted((r for r in rows if (r["network"], r["stage"], r["background"], r["axis"]) == row_key),
                       key=lambda r: r["shift_mm"])
        cosines = [f"{r['feature_cosine']:.4f}" for r in group if "feature_cosine" in r]
        lines.append(f"{row_key[0]:<18} {row_key[1]:<14} {row_key[2]:<10} {row_key[3]:<9} "
                     + " ".join(f"{r['median_error_mm']:7.1f}" for r in group) + "   " + " ".join(cosines))
    lines.append(f"fixed background intensity (outside the head, inputs scaled to [0, 1]): {extra['background_intensity']:.3f}")
    for background in BACKGROUNDS:
        figures = extra[background]
        lines.append(f"ours, background {background}: attention spread {figures['attention_spread_mm']:.1f} mm, "
                     f"effective keys {figures['attention_effective_keys']:.1f} (medians over the fixed brain, no shift)")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.txt").write_text(text + "\n")
    fields = list(dict.fromkeys(key for r in rows for key in r))
    with open(RESULTS / f"{args.output}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(
        {"models": {"ours": args.model, "displacement_only": args.unet_model}, "date": str(datetime.date.today()),
         "attention": extra, "rows": rows}, indent=2) + "\n")
    plot(rows, RESULTS / f"{args.output}.png")


def plot(rows: list, path: Path) -> None:
    """Median error against the shift, one panel per axis; the diagonal is a map that ignores the shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [("ours", "first step", "as is", "CARL: Ξ alone"), ("ours", "whole network", "as is", "CARL"),
              ("ours", "first step", "zeroed", "CARL: Ξ alone, background zeroed"),
              ("displacement_only", "first step", "as is", "displacement-only: first U-Net"),
              ("displacement_only", "whole network", "as is", "displacement-only")]
    figure, axes = plt.subplots(1, len(AXES), figsize=(5 * len(AXES), 4), sharey=True)
    for panel, axis_name in zip(axes, AXES):
        shifts = sorted({r["shift_mm"] for r in rows})
        panel.plot([0] + shifts, [0] + shifts, "k:", label="ignores the shift")
        for network, stage, background, label in curves:
            group = sorted((r for r in rows if (r["network"], r["stage"], r["background"], r["axis"])
                            == (network, stage, background, axis_name)), key=lambda r: r["shift_mm"])
            if group:
                panel.plot([0] + [r["shift_mm"] for r in group], [0] + [r["median_error_mm"] for r in group],
                           "o-", label=label)
        panel.set_title(f"fixed content shifted along {axis_name}")
        panel.set_xlabel("shift (mm)")
        panel.grid(alpha=0.3)
    axes[0].set_ylabel("median |φ'(x) − φ(x − u)| (mm)")
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
