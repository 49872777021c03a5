"""The inverse transform's round trip on a real pair: the exact inverse against the network's own.

``carl-brain-3d`` on the MONAI pair of ../shared/data (moving ``reoriented_anat_moved.nii``, fixed
``anatomical.nii``, 2 mm voxels), ``register(..., inverse=True)`` once per ``inverse_method``;
the round trip |ψ(φ(x)) − x| over the fixed image's foreground, as the summary reports it.
Writes bench/results/inverse.{txt,json}.

Usage: python bench/inverse.py
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIR = REPO.parent / "shared" / "data" / "tiny_fixtures" / "monai_anatomical_pair"
RESULTS = REPO / "bench" / "results"


def main() -> None:
    sys.path[:0] = [str(REPO / "CARLRegistration"), str(REPO / "bench")]
    import torch
    from unicarl import cpu_model

    from carlreg.pipeline import register

    torch.set_num_threads(2)
    rows = {}
    for method in ("exact", "network"):
        result = register(PAIR / "reoriented_anat_moved.nii", PAIR / "anatomical.nii", "carl-brain-3d",
                          modality="mr", device="cpu", inverse=True, inverse_method=method)
        rows[method] = {key: value for key, value in result.metrics.items() if key.startswith("inverse_round_trip")}
    header = (f"# bench/inverse.py, {datetime.date.today()}, CPU {cpu_model()}, "
              f"2 threads, carl-brain-3d, MONAI pair (fixed voxels 2 mm)")
    lines = [header, f"{'inverse':>8} {'mean mm':>8} {'p95 mm':>8} {'voxels':>8}"]
    for method, figures in rows.items():
        lines.append(f"{method:>8} {figures['inverse_round_trip_mean_mm']:8.3f} {figures['inverse_round_trip_p95_mm']:8.3f} "
                     f"{figures['inverse_round_trip_voxels']:8d}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inverse.txt").write_text("\n".join(lines) + "\n")
    (RESULTS / "inverse.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
