"""Models by name or file: the registry of shipped models, safe loading, checksums.

A shipped model is ``carlreg/weights/<name>.pt`` (a state_dict) beside its model card
``carlreg/weights/<name>.json`` (:mod:`carlreg.registry`)::

    {"name": ..., "file": "<name>.pt", "sha256": ...,
     "architecture": {"dimension": 3, "input_shape": [z, y, x], "variant": "final_final",
                      "fourth_step": false, "width": 0.25, "first_step": "attention",
                      "input_spacing_mm": 3.0,    # optional: None resizes whole arrays
                      "box_shape": [z, y, x]},    # optional: the largest box it was trained on
     "modality": "mr", ...}

A card whose architecture's ``family`` is ``"unicarl"`` describes the authors' uniCARL
(:mod:`carlreg.network.unicarl`; its weights are downloaded on first use).

``load_model`` also takes the path of such a state_dict (its card beside it), of a training
checkpoint written by ``carl-train`` (which carries its configuration), of the authors' uniCARL
file (recognised by its keys), or any
``torch.nn.Module`` with the model interface (see :mod:`carlreg.pipeline`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from .device import resolve_device
from .network import CARLConfig, build_from_config
from .network.unicarl import CHECKPOINT_PREFIX, build_unicarl, load_unicarl_checkpoint
from .progress import CancelCheck, ProgressCallback
from .registry import WEIGHTS_DIR, available_models, model_card, sha256_of, weights_path

__all__ = ["WEIGHTS_DIR", "available_models", "model_card", "load_model", "checkpoint_weights", "sha256_of", "weights_path"]

def _config_from_architecture(architecture: Dict, source: str) -> CARLConfig:
    try:
        return CARLConfig(
            dimension=int(architecture["dimension"]),
            input_shape=tuple(int(n) for n in architecture["input_shape"]),
            variant=str(architecture.get("variant", "final_final")),
            fourth_step=bool(architecture.get("fourth_step", False)),
            width=float(architecture.get("width", 1.0)),
            first_step=str(architecture.get("first_step", "attention")),
            trained_box=tuple(int(n) for n in architecture.get("box_shape") or ()),
            input_spacing_mm=None if architecture.get("input_spacing_mm") is None else float(architecture["input_spacing_mm"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"load_model(): {source} has no valid architecture (dimension, input_shape, ...): {err}") from err


def _build_and_load(config: CARLConfig, state: Dict[str, torch.Tensor], source: str) -> nn.Module:
    model = build_from_config(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing keys {missing[:3]}{' …' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected keys {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            details.append(f"shape of {k}: checkpoint {tuple(state[k].shape)}, network {tuple(expected[k].shape)}")
        raise ValueError(f"load_model(): {source} does not fit a CARL network {config}: " + "; ".join(details))
    model.load_state_dict(state, strict=True)
    return model


def _unicarl(state: Dict[str, torch.Tensor], input_shape=None) -> nn.Module:
    """uniCARL (the authors' file, or our own state_dict of it)."""
    model = build_unicarl(input_shape) if input_shape else build_unicarl()
    load_unicarl_checkpoint(model, state)
    return model


def _is_unicarl_file(state) -> bool:
    """The authors' uniCARL file: a state_dict whose keys carry the training wrapper's prefix."""
    return isinstance(state, dict) and bool(state) and all(str(k).startswith(CHECKPOINT_PREFIX) for k in state)


def checkpoint_weights(state: Dict) -> Dict[str, torch.Tensor]:
    """The weights a carl-train checkpoint stands for: the average of its trained weights when the
    run keeps one (``ema_decay``), else the trained weights themselves."""
    return state["average"] if "average" in state else state["model"]


def _load_file(path: Path) -> Dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file
        raise ValueError(f"load_model(): cannot load {path} safely: {str(err).splitlines()[0]}") from err


def load_model(
    name_or_path: Union[str, os.PathLike, nn.Module],
    device: Union[str, torch.device] = "auto",
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
) -> nn.Module:
    """A model in eval mode on ``device``: a shipped model's name, a weights file, or a module.

    A shipped model whose weights are downloaded on first use reports the download to
    ``progress`` (stage ``download``) and stops when ``should_cancel()`` is true."""
    device = resolve_device(device)
    if isinstance(name_or_path, nn.Module):
        model = name_or_path
        if not hasattr(model, "input_shape"):
            raise ValueError("load_model(): a custom module must carry its input_shape (spatial, tensor order)")
        return model.to(device).eval()
    text = str(name_or_path)
    path = Path(text)
    if not path.exists() and os.sep not in text and not text.endswith((".pt", ".pth")):
        card = model_card(text)
        state = _load_file(weights_path(text, progress, should_cancel))
        if card["architecture"].get("family") == "unicarl":
            return _unicarl(state, card["architecture"].get("input_shape")).to(device).eval()
        config = _config_from_architecture(card["architecture"], f"model card {text}")
        return _build_and_load(config, state, f"model {text}").to(device).eval()
    if not path.is_file():
        raise ValueError(f"load_model(): model file not found: {path}")
    state = _load_file(path)
    if _is_unicarl_file(state):  # the authors' file, placed by hand
        return _unicarl(state).to(device).eval()
    if isinstance(state, dict) and "model" in state and "config" in state:  # a carl-train checkpoint
        settings = state["config"]
        architecture = dict(settings, dimension=len(settings["input_shape"]))
        # synthseg3d trains on boxes of a physical spacing; the other sources resize whole arrays
        if settings.get("data") == "synthseg3d":
            architecture["input_spacing_mm"] = settings.get("spacing_mm")
        config = _config_from_architecture(architecture, str(path))
        return _build_and_load(config, checkpoint_weights(state), str(path)).to(device).eval()
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise ValueError(
            f"load_model(): {path} is a bare state_dict; put its model card {card_path.name} beside it "
            "(architecture: dimension, input_shape, variant, fourth_step, width)"
        )
    card = json.loads(card_path.read_text())
    if card.get("sha256") and sha256_of(path) != card["sha256"]:
        raise ValueError(f"load_model(): checksum mismatch for {path}: the file is damaged or not the one its card describes")
    config = _config_from_architecture(card.get("architecture", {}), str(card_path))
    return _build_and_load(config, state, str(path)).to(device).eval()
