"""Landmark files and the target registration error (TRE).

Reads Slicer markups (``.fcsv``, ``.mrk.json``) and CSV files (columns ``x, y, z`` and an
optional ``label``; their coordinate system must be stated). Points are returned in LPS
millimetres, SimpleITK's frame; RAS files are converted by negating x and y.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import SimpleITK as sitk

from .io import PathLike

__all__ = ["Landmarks", "read_landmarks", "target_registration_error"]

#: RAS ↔ LPS: negate the first two coordinates
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


class Landmarks(NamedTuple):
    labels: List[str]
    points_lps: np.ndarray  # (N, 3) LPS mm


def _system(value: str, path: Path) -> str:
    text = str(value).strip().upper()
    if text in ("0", "RAS"):
        return "RAS"
    if text in ("1", "LPS"):
        return "LPS"
    raise ValueError(f"read_landmarks(): unknown coordinate system {value!r} in {path}")


def _read_fcsv(path: Path) -> Landmarks:
    system, labels, points = "RAS", [], []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            if "CoordinateSystem" in line:
                system = _system(line.split("=", 1)[1], path)
            continue
        if not line.strip():
            continue
        fields = next(csv.reader([line]))
        points.append([float(v) for v in fields[1:4]])
        labels.append(fields[11] if len(fields) > 11 and fields[11] else fields[0])
    return Landmarks(labels, np.array(points, dtype=float).reshape(-1, 3) * (RAS_TO_LPS if system == "RAS" else 1.0))


def _read_mrk_json(path: Path) -> Landmarks:
    markups = json.loads(path.read_text()).get("markups", [])
    if not markups:
        raise ValueError(f"read_landmarks(): no markups in {path}")
    system = _system(markups[0].get("coordinateSystem", "LPS"), path)
    points = markups[0].get("controlPoints", [])
    coordinates = np.array([p["position"] for p in points], dtype=float).reshape(-1, 3)
    labels = [p.get("label") or str(i) for i, p in enumerate(points)]
    return Landmarks(labels, coordinates * (RAS_TO_LPS if system == "RAS" else 1.0))


def _read_csv(path: Path, coordinate_system: Optional[str]) -> Landmarks:
    if coordinate_system is None:
        raise ValueError(f"read_landmarks(): {path} is CSV: state its coordinate system (RAS or LPS)")
    system = _system(coordinate_system, path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"x", "y", "z"} <= set(rows[0]):
        raise ValueError(f"read_landmarks(): {path} needs columns x, y, z (and optionally label)")
    points = np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in rows])
    labels = [r.get("label") or str(i) for i, r in enumerate(rows)]
    return Landmarks(labels, points * (RAS_TO_LPS if system == "RAS" else 1.0))


def read_landmarks(path: PathLike, coordinate_system: Optional[str] = None) -> Landmarks:
    """Landmarks from ``.fcsv``, ``.mrk.json`` or ``.csv`` (then ``coordinate_system`` is RAS or LPS)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"read_landmarks(): landmark file not found: {path}")
    name = path.name.lower()
    if name.endswith(".fcsv"):
        return _read_fcsv(path)
    if name.endswith(".json"):
        return _read_mrk_json(path)
    if name.endswith(".csv"):
        return _read_csv(path, coordinate_system)
    raise ValueError(f"read_landmarks(): {path} is not .fcsv, .mrk.json or .csv")


def _pair(fixed: Landmarks, moving: Landmarks):
    common = [label for label in fixed.labels if label in moving.labels]
    if len(set(fixed.labels)) == len(fixed.labels) and len(set(moving.labels)) == len(moving.labels) and common:
        fixed_index = [fixed.labels.index(label) for label in common]
        moving_index = [moving.labels.index(label) for label in common]
        return fixed.points_lps[fixed_index], moving.points_lps[moving_index]
    if len(fixed.labels) != len(moving.labels):
        raise ValueError(
            f"target_registration_error(): landmarks match neither by label nor by count "
            f"({len(fixed.labels)} fixed, {len(moving.labels)} moving)"
        )
    return fixed.points_lps, moving.points_lps


def target_registration_error(transform: sitk.Transform, fixed: Landmarks, moving: Landmarks) -> Dict[str, float]:
    """TRE in mm of the fixed → moving transform: ``|T(fixed landmark) − moving landmark|``.

    Landmarks are matched by label when the labels are unique and shared, else by order.
    Returns mean, median and max, before (identity) and after.
    """
    fixed_points, moving_points = _pair(fixed, moving)
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in fixed_points])
    before = np.linalg.norm(fixed_points - moving_points, axis=1)
    after = np.linalg.norm(mapped - moving_points, axis=1)
    return {
        "tre_before_mean_mm": float(before.mean()),
        "tre_after_mean_mm": float(after.mean()),
        "tre_after_median_mm": float(np.median(after)),
        "tre_after_max_mm": float(after.max()),
        "landmarks": float(len(after)),
    }
