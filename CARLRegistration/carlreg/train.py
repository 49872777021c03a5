"""Training CARL: the paper's schedule, checkpoints every N steps, exact resume.

Phase 1 (``diffusion_steps`` steps) minimises the diffusion-regularised objective, phase 2 the
GradICON objective (:mod:`carlreg.losses`); Adam, lr 1e-4 by default. Every step seeds the
global generator (GradICON's jitter) and draws its batch from a generator seeded by
``(seed, step)``; with the model, optimizer and step restored from a checkpoint, a resumed run
continues exactly as the uninterrupted run would have.

Files in ``output``: ``checkpoint.pt`` (model, optimizer, step, config; written under temporary
names and renamed together with ``model.pt``), ``model.pt`` (the weights alone), ``log.jsonl`` (one line per step, plus
validation lines) and ``config.json``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .data import BRAIN_LABEL_LIMIT, SynthSegSource
from .io import atomic_outputs
from .losses import make_objective
from .maps import sample
from .metrics import mean_dice
from .network import build_carl
from .progress import CancelCheck, ProgressCallback, StageReporter

__all__ = ["TrainConfig", "train", "load_checkpoint"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """One training run. ``input_shape`` is in tensor order (z, y, x)."""

    data: str = "synthseg3d"
    data_folder: str = "../shared/data/synthseg_label_maps"
    input_shape: Tuple[int, ...] = (80, 96, 80)
    spacing_mm: float = 2.2
    max_shift: int = 8
    variant: str = "final_final"
    fourth_step: bool = False
    width: float = 0.25
    batch_size: int = 2
    learning_rate: float = 1e-4
    lmbda: float = 1.5
    sigma: float = 4.0
    diffusion_steps: int = 300
    steps: int = 50_000
    checkpoint_every: int = 25
    validate_every: int = 200
    validation_pairs: int = 4
    seed: int = 0
    output: str = "runs/carl-brain-3d"

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "input_shape" in values:
            values["input_shape"] = tuple(int(n) for n in values["input_shape"])
        return cls(**values)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A training checkpoint, loaded safely (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _make_source(config: TrainConfig, split: str):
    if config.data != "synthseg3d":
        raise ValueError(f"train(): data source must be 'synthseg3d', got {config.data!r}")
    max_shift = config.max_shift if split == "train" else 0
    return SynthSegSource(Path(config.data_folder), split, config.input_shape, config.spacing_mm, max_shift)


@torch.no_grad()
def validate(model: torch.nn.Module, source: SynthSegSource, pairs: int, device: torch.device) -> Dict[str, float]:
    """Mean Dice over brain structures before and after registration, on fixed random-contrast pairs."""
    was_training = model.training
    model.eval()
    batch = source.batch(pairs, torch.Generator().manual_seed(12345))
    before, after = [], []
    for i in range(pairs):
        moving, fixed = batch.moving[i : i + 1].to(device), batch.fixed[i : i + 1].to(device)
        fixed_to_moving = model(moving, fixed)
        warped = sample(batch.moving_labels[i : i + 1].float().to(device), fixed_to_moving, mode="nearest")
        fixed_labels = batch.fixed_labels[i : i + 1].to(device)
        before.append(mean_dice(batch.moving_labels[i : i + 1].to(device), fixed_labels, BRAIN_LABEL_LIMIT))
        after.append(mean_dice(warped.round().long(), fixed_labels, BRAIN_LABEL_LIMIT))
    model.train(was_training)
    return {"val_dice_before": sum(before) / pairs, "val_dice_after": sum(after) / pairs}


def train(
    config: TrainConfig,
    device: torch.device = torch.device("cpu"),
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
    max_steps_this_run: Optional[int] = None,
) -> torch.nn.Module:
    """Train (or resume from ``output/checkpoint.pt``) up to ``config.steps`` steps.

    ``max_steps_this_run`` stops early after that many steps (the checkpoint is then
    written), for runs that are interrupted by design. Returns the model.
    """
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = build_carl(3, config.input_shape, config.variant, config.fourth_step, config.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    start = 0
    if (output / CHECKPOINT).exists():
        state = load_checkpoint(output / CHECKPOINT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    (output / "config.json").write_text(json.dumps(asdict(config), indent=2))
    source = _make_source(config, "train")
    validation = _make_source(config, "validation") if config.validate_every else None
    objectives = {
        "diffusion": make_objective("diffusion", model, config.lmbda, config.sigma),
        "gradicon": make_objective("gradicon", model, config.lmbda, config.sigma),
    }
    end = config.steps if max_steps_this_run is None else min(config.steps, start + max_steps_this_run)
    reporter = StageReporter("training", end - start, progress, should_cancel)
    model.train()
    with open(output / "log.jsonl", "a") as log:
        for step in range(start, end):
            began = time.perf_counter()
            torch.manual_seed(config.seed * 1_000_003 + step)
            batch = source.batch(config.batch_size, _step_generator(config.seed, step))
            phase = "diffusion" if step < config.diffusion_steps else "gradicon"
            optimizer.zero_grad()
            terms = objectives[phase](batch.moving.to(device), batch.fixed.to(device))
            terms.total.backward()
            optimizer.step()
            record = {
                "step": step + 1,
                "phase": phase,
                "loss": float(terms.total.detach()),
                "similarity": float(terms.similarity.detach()),
                "regularity": float(terms.regularity.detach()),
                "seconds": time.perf_counter() - began,
            }
            done = step + 1
            if done % config.checkpoint_every == 0 or done == end:
                _save(model, optimizer, done, config, output)
            if validation is not None and done % config.validate_every == 0:
                record.update(validate(model, validation, config.validation_pairs, device))
            log.write(json.dumps(record) + "\n")
            log.flush()
            reporter.report(done - start, f"{phase} loss {record['loss']:.4f}")
    return model


def _save(model, optimizer, step: int, config: TrainConfig, output: Path) -> None:
    with atomic_outputs() as reserve:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": asdict(config)}
        torch.save(state, reserve(output / CHECKPOINT))
        torch.save(model.state_dict(), reserve(output / "model.pt"))
