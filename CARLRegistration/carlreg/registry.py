"""The registry of shipped models: names, model cards, checksums (no torch needed).

A shipped model is ``<WEIGHTS_DIR>/<name>.pt`` beside its model card ``<name>.json``. They are
package data (``carlreg/weights``), so a wheel install, an editable install and the Slicer
extension (``CARLRegistration/CMakeLists.txt``) all find them in the same place. The Slicer module
lists them from its GUI process, where torch may not be installed yet. A card
may instead give a ``url``: the weights are then downloaded on first use into a user cache
folder (never the install folder) by :mod:`carlreg.download`, verified against the card's
SHA256 or, where the publisher gives none, against the one recorded at the first download.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from .download import DownloadError, download_file
from .progress import CancelCheck, ProgressCallback

__all__ = [
    "WEIGHTS_DIR", "CACHE_DIR", "DEFAULT_MODELS", "available_models", "default_model", "model_card",
    "describe_models", "weights_path", "sha256_of",
]

#: the folder of the shipped models: ``$CARLREG_WEIGHTS``, else the package's own ``weights``
WEIGHTS_DIR = Path(os.environ.get("CARLREG_WEIGHTS") or Path(__file__).resolve().parent / "weights")
#: the model used when none is named, per image dimension (the 2-D models are research models of
#: the retina experiment, so 2-D images must name one)
DEFAULT_MODELS = {3: "carl-brain-3d"}
#: downloaded weights: ``$CARLREG_CACHE`` or ``~/.cache/carlreg``
CACHE_DIR = Path(os.environ.get("CARLREG_CACHE", Path.home() / ".cache" / "carlreg"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def available_models(dimension: Optional[int] = None, baselines: bool = True) -> List[str]:
    """Names of the shipped models (cards in ``WEIGHTS_DIR`` with their weights file present or a
    url), optionally only those for images of ``dimension`` (2 or 3); ``baselines=False`` leaves
    out the comparison networks (cards with ``baseline_for``) that serve the benchmarks."""
    names = []
    for card in sorted(WEIGHTS_DIR.glob("*.json")):
        try:
            info = json.loads(card.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(info, dict) or not isinstance(info.get("architecture"), dict):
            continue
        if dimension is not None and info["architecture"].get("dimension") != dimension:
            continue
        if not baselines and info.get("baseline_for"):
            continue
        if (WEIGHTS_DIR / info.get("file", "")).is_file() or info.get("url"):
            names.append(card.stem)
    return names


def model_card(name: str) -> Dict:
    """The model card of a shipped model."""
    card = WEIGHTS_DIR / f"{name}.json"
    if not card.is_file():
        raise ValueError(f"load_model(): no model named {name!r}; shipped models: {available_models() or 'none'}")
    return json.loads(card.read_text())


def default_model(dimension: int) -> str:
    """The model for images of ``dimension`` when none is named (:data:`DEFAULT_MODELS`).

    Raises:
        ValueError: no default for that dimension, or the default is not installed; the message
            lists the models there are.
    """
    name = DEFAULT_MODELS.get(dimension)
    if name is None or name not in available_models(dimension):
        raise ValueError(
            f"no default model for {dimension}-D images: name one with --model "
            f"({', '.join(available_models(dimension)) or 'none installed'}; --list-models describes them)"
        )
    return name


def describe_models() -> List[Dict[str, str]]:
    """One row per available model, for listings: ``name``, ``dimension``, ``input`` (grid and
    spacing), ``modality``, ``title``, ``weights`` (where the file is, or its download size)."""
    rows = []
    for name in available_models():
        card = model_card(name)
        architecture = card["architecture"]
        shape = " × ".join(str(n) for n in architecture["input_shape"])
        spacing = architecture.get("input_spacing_mm")
        local = WEIGHTS_DIR / card["file"]
        if local.is_file():
            weights = f"shipped, {local.stat().st_size / 2**20:.0f} MiB"
        else:
            size = card.get("size_bytes")
            weights = "downloaded once on first use" + (f", {size / 2**20:.0f} MiB" if size else "")
        rows.append({
            "name": name,
            "dimension": f"{architecture['dimension']}-D",
            "input": f"{shape} at {spacing:g} mm" if spacing else f"{shape} (whole image resized)",
            "modality": card.get("modality", ""),
            "title": card.get("title", "") + (f" (baseline of {card['baseline_for']})" if card.get("baseline_for") else ""),
            "weights": weights,
        })
    return rows


def weights_path(name: str, progress: Optional[ProgressCallback] = None, should_cancel: Optional[CancelCheck] = None) -> Path:
    """The weights file of a shipped model: in ``WEIGHTS_DIR``, else in ``CACHE_DIR``, downloaded
    from the card's ``url`` on first use (stage ``download`` of ``progress``; cancellable).

    The file's SHA256 is the card's when it gives one; otherwise (a publisher that gives none, as
    for uniCARL) it is recorded at the first download, in ``<file>.sha256`` beside it, and every
    later use verifies the file against it.

    Raises:
        ValueError: unknown model, no file and no ``url``, a download that fails (the message says
            how to place the file by hand) or whose SHA256 differs from the card's, or a cached
            file that changed since it was recorded (nothing is kept or used then).
    """
    card = model_card(name)
    local = WEIGHTS_DIR / card["file"]
    if local.is_file():
        if card.get("sha256") and sha256_of(local) != card["sha256"]:
            raise ValueError(f"load_model(): checksum mismatch for {local}: the file is damaged or not the shipped one")
        return local
    if not card.get("url"):
        raise ValueError(f"load_model(): the weights of {name!r} are missing and its card gives no url")
    target = CACHE_DIR / card["file"]
    if target.is_file():
        _verify_cached(name, card, target)
    else:
        _download(name, card, target, progress, should_cancel)
    return target


def _record_of(target: Path) -> Path:
    """Where the SHA256 of a downloaded file is recorded when its card gives none."""
    return target.with_name(target.name + ".sha256")


def _download(name: str, card: Dict, target: Path, progress: Optional[ProgressCallback], should_cancel: Optional[CancelCheck]) -> None:
    """Download a model's weights into ``target``: checked against the card's SHA256, or its SHA256
    recorded (the digest of the transfer itself: the file is not read again)."""
    try:
        digest = download_file(card["url"], target, card.get("size_bytes"), progress, should_cancel)
    except DownloadError as err:
        raise ValueError(
            f"load_model(): cannot download {name!r} from {card['url']} ({err}); on a machine without "
            f"that access, place the file at {target} (or set CARLREG_CACHE to its folder)"
        ) from err
    if card.get("sha256") and digest != card["sha256"]:
        target.unlink()
        raise ValueError(f"load_model(): the download of {name!r} does not match its SHA256; nothing was kept")
    if not card.get("sha256"):
        _record_of(target).write_text(digest + "\n")


def _verify_cached(name: str, card: Dict, target: Path) -> None:
    """A cached weights file checked against the card's SHA256 or the recorded one; a file placed
    by hand, with nothing recorded yet, has its SHA256 recorded now and checked from then on."""
    record = _record_of(target)
    expected = card.get("sha256") or (record.read_text().strip() if record.is_file() else "")
    actual = sha256_of(target)
    if not expected:
        record.write_text(actual + "\n")
    elif actual != expected:
        raise ValueError(
            f"load_model(): {target} is not the file first downloaded for {name!r} (SHA256 {actual[:12]}…, "
            f"recorded {expected[:12]}…): delete it to download it again"
        )
