"""The registry of shipped models: names, model cards, checksums (no torch needed).

A shipped model is ``<WEIGHTS_DIR>/<name>.pt`` beside its model card ``<name>.json``; the
Slicer module lists them from its GUI process, where torch may not be installed yet.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List

__all__ = ["WEIGHTS_DIR", "available_models", "model_card", "sha256_of"]

#: shipped models: ``$CARLREG_WEIGHTS`` or the repository's ``weights/`` folder
WEIGHTS_DIR = Path(os.environ.get("CARLREG_WEIGHTS", Path(__file__).resolve().parents[2] / "weights"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def available_models() -> List[str]:
    """Names of the shipped models (cards in ``WEIGHTS_DIR`` with their weights file present)."""
    names = []
    for card in sorted(WEIGHTS_DIR.glob("*.json")):
        try:
            info = json.loads(card.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "architecture" in info and (WEIGHTS_DIR / info.get("file", "")).is_file():
            names.append(card.stem)
    return names


def model_card(name: str) -> Dict:
    """The model card of a shipped model."""
    card = WEIGHTS_DIR / f"{name}.json"
    if not card.is_file():
        raise ValueError(f"load_model(): no model named {name!r}; shipped models: {available_models() or 'none'}")
    return json.loads(card.read_text())


