"""The report PNG: fixed, moving, warped, a checkerboard, the deformed grid and the Jacobian.

Each panel shows the middle slice of the fixed grid (the middle of its last SimpleITK axis);
the moving image is shown resampled onto that grid without registration, so that the panels
line up. Needs matplotlib (imported only here).
"""
from __future__ import annotations

from typing import Dict, Union

import numpy as np
import SimpleITK as sitk

from .io import PathLike

__all__ = ["write_report"]


def _middle(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    return array[array.shape[0] // 2] if image.GetDimension() == 3 else array


def _display_range(*slices: np.ndarray):
    values = np.concatenate([s.ravel() for s in slices])
    return np.percentile(values, 1), np.percentile(values, 99)


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    rows = (np.arange(a.shape[0]) * tiles // a.shape[0])[:, None]
    cols = (np.arange(a.shape[1]) * tiles // a.shape[1])[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def _grid_lines(axis, field: sitk.Image, background: np.ndarray, step: int) -> None:
    """Lines of the fixed grid displaced by the in-plane part of the field (in voxels of the slice)."""
    dimension = field.GetDimension()
    vectors = _middle(field)  # (rows, cols, D) LPS mm
    index_to_lps = np.array(field.GetDirection()).reshape(dimension, dimension) @ np.diag(field.GetSpacing())
    in_index = vectors @ np.linalg.inv(index_to_lps).T  # displacement in index units, (x, y[, z]) order
    rows, cols = np.mgrid[0 : vectors.shape[0], 0 : vectors.shape[1]].astype(float)
    x, y = cols + in_index[..., 0], rows + in_index[..., 1]
    axis.imshow(background, cmap="gray", alpha=0.35)
    for r in range(0, vectors.shape[0], step):
        axis.plot(x[r], y[r], color="tab:orange", lw=0.6)
    for c in range(0, vectors.shape[1], step):
        axis.plot(x[:, c], y[:, c], color="tab:orange", lw=0.6)
    axis.set_xlim(0, vectors.shape[1] - 1)
    axis.set_ylim(vectors.shape[0] - 1, 0)


def write_report(
    path: PathLike,
    fixed: sitk.Image,
    moving_on_fixed: sitk.Image,
    warped: sitk.Image,
    field: sitk.Image,
    jacobian: sitk.Image,
    metrics: Dict[str, Union[float, str]],
) -> None:
    """Write the report PNG to ``path``.

    ``moving_on_fixed`` is the moving image resampled onto the fixed grid without registration;
    ``field`` the fixed → moving displacement field (LPS mm) on the grid of ``jacobian``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed_slice, moving_slice, warped_slice = (_middle(i) for i in (fixed, moving_on_fixed, warped))
    low, high = _display_range(fixed_slice, moving_slice, warped_slice)
    figure, axes = plt.subplots(2, 3, figsize=(13, 9))
    panels = [("fixed", fixed_slice), ("moving (not registered)", moving_slice), ("warped moving", warped_slice)]
    for axis, (title, image) in zip(axes[0], panels):
        axis.imshow(image, cmap="gray", vmin=low, vmax=high)
        axis.set_title(title)
    axes[1, 0].imshow(_checkerboard(fixed_slice, warped_slice), cmap="gray", vmin=low, vmax=high)
    axes[1, 0].set_title("checkerboard fixed / warped")
    step = max(2, min(field.GetSize()[:2]) // 24)
    _grid_lines(axes[1, 1], field, _middle(sitk.Resample(fixed, field)), step)
    axes[1, 1].set_title("deformed grid (fixed → moving)")
    determinant = _middle(jacobian)
    spread = max(1e-3, float(np.abs(determinant - 1).max()))
    shown = axes[1, 2].imshow(determinant, cmap="RdBu_r", vmin=1 - spread, vmax=1 + spread)
    axes[1, 2].set_title("Jacobian determinant (≤ 0: folding)")
    figure.colorbar(shown, ax=axes[1, 2], fraction=0.046)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    summary = (
        f"LNCC {metrics['lncc_before']:.3f} → {metrics['lncc_after']:.3f}    "
        f"folding {metrics['folding_percent']:.3f} %    "
        + (f"Dice {metrics['dice_before']:.3f} → {metrics['dice_after']:.3f}    " if "dice_after" in metrics else "")
        + f"{metrics['seconds']:.1f} s on {metrics['device']}"
    )
    figure.suptitle(summary, fontsize=13)
    figure.tight_layout()
    figure.savefig(path, dpi=90, format="png")
    plt.close(figure)
