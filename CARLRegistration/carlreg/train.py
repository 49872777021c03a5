"""Training CARL: the paper's schedule, checkpoints every N steps, exact resume.

Data-parallel: started by ``torchrun`` (or in any initialised ``torch.distributed`` process
group: NCCL on GPUs, gloo on CPUs), every rank trains on its own batches and DDP averages the
gradients, so all ranks hold the same weights; rank 0 writes the files.

Phase 1 (``diffusion_steps`` steps) minimises the diffusion-regularised objective, phase 2 the
GradICON objective (:mod:`carlreg.losses`); Adam, lr 1e-4 by default. Every step seeds the
global generator (GradICON's jitter) and draws its batch from a generator seeded by
``(seed, step)``; with the model, optimizer and step restored from a checkpoint, a resumed run
continues exactly as the uninterrupted run would have.

With ``ema_decay`` the run also keeps an exponential moving average of its weights (BatchNorm
statistics included, ``torch.optim.swa_utils``), which stands for the run: validated, written to
``model.pt`` and loaded from the checkpoint; the figure of one pair otherwise moves with the last
steps' noise. The average is bias-corrected (:func:`_corrected_ema`): the mean of the steps'
weights, step ``i`` of ``t`` weighted by ``decay ** (t - i)``, over the steps after ``ema_start``
(before them the trained weights stand for the run).

Files in ``output``: ``checkpoint.pt`` (model, optimizer, step, config, and the average; written
under temporary names and renamed together with ``model.pt``), ``model.pt`` (the run's weights
alone: the average when kept), ``log.jsonl`` (one line per step, plus validation lines),
``loss.png`` (the curves, redrawn at each checkpoint when matplotlib is installed) and
``config.json``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from .data import BRAIN_LABEL_LIMIT, LabelPair, PairsSource, SynthSegSource
from .device import describe_device
from .io import atomic_outputs
from .losses import LossTerms, make_objective
from .maps import sample
from .metrics import mean_dice
from .models import checkpoint_weights
from .network import build_carl, set_box
from .progress import CancelCheck, ProgressCallback, StageReporter
from .retina import DriveSource

__all__ = ["TrainConfig", "PhaseObjective", "train", "load_checkpoint", "plot_log", "init_distributed_from_environment"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """One training run. ``input_shape`` is in tensor order (z, y, x)."""

    #: synthseg3d (3-D brains), drive2d (the paper's 2-D retina experiment) or pairs (a CSV)
    data: str = "synthseg3d"
    #: synthseg3d: the label maps' folder; drive2d: the DRIVE folder; pairs: the CSV of training pairs
    data_folder: str = "../shared/data/synthseg_label_maps"
    #: drive2d: the training variant (baseline, shift or scale_shift; see carlreg.retina)
    retina_variant: str = "baseline"
    #: pairs: the CSV of validation pairs (with label maps), or "" for none
    validation_csv: str = ""
    #: pairs: intensity normalisation (see carlreg.preprocess)
    modality: str = "auto"
    #: synthseg3d: the synthesised background, random or dark (see carlreg.data.BACKGROUNDS)
    background: str = "random"
    input_shape: Tuple[int, ...] = (80, 96, 80)
    #: synthseg3d: the box the network trains on (tensor order; () for ``input_shape``): larger,
    #: it holds the head with room for large shifts. The U-Nets' displacements stay in
    #: ``input_shape``'s frame (:func:`carlreg.network.set_box`), so weights trained on one box
    #: carry over to another, and the model card's ``input_shape`` stays the smallest box.
    box_shape: Tuple[int, ...] = ()
    spacing_mm: float = 2.2
    #: synthseg3d: the largest translation of each image (voxels per axis), and how a pair's two
    #: translations are drawn (``each`` or ``relative``, see :data:`carlreg.data.SHIFT_MODES`)
    max_shift: int = 8
    shifts: str = "each"
    #: synthseg3d: the smallest field of view (mm per axis; 0: none): each training image's content
    #: is cut to a window centred in the box, between this and the box's extent (see
    #: :class:`carlreg.data.SynthSegSource`); validation images are not cut
    field_of_view_mm: float = 0.0
    #: synthseg3d: the similarity taken only where both images are valid (content neither moved
    #: out of the box nor cut to a field of view; see :func:`carlreg.losses.symmetric_similarity`)
    mask_similarity: bool = False
    #: synthseg3d: the weight of the label overlap (soft Dice of the warped brain label maps, both
    #: ways; see :func:`carlreg.losses.symmetric_label_overlap`) added to the loss, supervision by
    #: the maps the images are synthesised from, as SynthMorph trains; 0: unsupervised
    label_weight: float = 0.0
    #: the decay per step of the weights' exponential moving average that stands for the run
    #: (validated, written to ``model.pt``; 0.999 averages over about the last thousand steps);
    #: 0: none, the last step's weights
    ema_decay: float = 0.0
    #: the average takes the steps after this one: a run fine-tuned from other weights leaves its
    #: first steps' transient out of it
    ema_start: int = 0
    variant: str = "final_final"
    fourth_step: bool = False
    first_step: str = "attention"
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
    #: a new run's starting weights (a carl-train checkpoint or a state_dict file of the same
    #: architecture; the input shape may differ), or "" for a random initialisation
    init_from: str = ""

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown}; known: {sorted(known)}")
        values = dict(values)
        for key in ("input_shape", "box_shape"):
            if key in values:
                values[key] = tuple(int(n) for n in values[key])
        return cls(**values)

    @property
    def box(self) -> Tuple[int, ...]:
        """The box the network trains on: ``box_shape``, or ``input_shape``."""
        return tuple(self.box_shape) or tuple(self.input_shape)


def _step_seed(seed: int, step: int, rank: int, world: int) -> int:
    return seed * 1_000_003 + step * world + rank


class PhaseObjective(nn.Module):
    """Both phases' objectives around one network, so that one DDP wrapper serves both."""

    def __init__(self, network: nn.Module, lmbda: float, sigma: float, label_weight: float = 0.0) -> None:
        super().__init__()
        self.diffusion = make_objective("diffusion", network, lmbda, sigma, label_weight)
        self.gradicon = make_objective("gradicon", network, lmbda, sigma, label_weight)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, phase: str, *guides: Optional[torch.Tensor]):
        """``guides``: the optional validity masks and one-hot label maps, in the objectives' order."""
        return getattr(self, phase)(moving, fixed, *guides)


def _masks(batch: LabelPair, device: torch.device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The batch's validity masks on ``device`` (``mask_similarity``; None: every voxel valid)."""
    return tuple(None if m is None else m.to(device) for m in (batch.moving_valid, batch.fixed_valid))


def one_hot_labels(batch: LabelPair, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batch's moving and fixed label maps as ``(B, C, *shape)`` float one-hot maps on
    ``device``, one channel per brain label (``0 < label <`` :data:`carlreg.data.BRAIN_LABEL_LIMIT`)
    present in either map, in increasing order."""
    both = torch.cat([batch.moving_labels.flatten(), batch.fixed_labels.flatten()])
    codes = [int(v) for v in torch.unique(both) if 0 < int(v) < BRAIN_LABEL_LIMIT]
    channels = torch.tensor(codes, device=device).view(1, -1, *([1] * (batch.moving_labels.dim() - 2)))
    return tuple((labels.to(device) == channels).float() for labels in (batch.moving_labels, batch.fixed_labels))


def _rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_environment() -> Optional[int]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1); returns the local rank, or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("LOCAL_RANK", "0"))


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A training checkpoint (or a state_dict file), loaded safely (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _make_source(config: TrainConfig, split: str):
    """The data of one split, or None (pairs without a validation list)."""
    if config.data == "pairs":
        path = config.data_folder if split == "train" else config.validation_csv
        return PairsSource(Path(path), config.input_shape, config.modality) if path else None
    if config.data == "drive2d":
        if tuple(config.input_shape) != DriveSource.shape:
            raise ValueError(f"train(): drive2d images are {list(DriveSource.shape)}, input_shape is {list(config.input_shape)}")
        # the retina protocol has no validation images: validation draws fixed warps of training images
        return DriveSource(Path(config.data_folder), "train", config.retina_variant)
    if config.data != "synthseg3d":
        raise ValueError(f"train(): data source must be 'synthseg3d', 'drive2d' or 'pairs', got {config.data!r}")
    max_shift = config.max_shift if split == "train" else 0
    field_of_view = round(config.field_of_view_mm / config.spacing_mm) if split == "train" else 0
    return SynthSegSource(Path(config.data_folder), split, config.box, config.spacing_mm, max_shift, config.background,
                          config.shifts, field_of_view)


@torch.no_grad()
def validate(
    model: torch.nn.Module, source, pairs: int, device: torch.device, below: Optional[int] = None
) -> Dict[str, float]:
    """Mean Dice (over labels ``< below`` if given) before and after registration, on a fixed draw of pairs."""
    was_training = model.training
    model.eval()
    batch = source.batch(pairs, torch.Generator().manual_seed(12345))
    before, after = [], []
    for i in range(pairs):
        moving, fixed = batch.moving[i : i + 1].to(device), batch.fixed[i : i + 1].to(device)
        fixed_to_moving = model(moving, fixed)
        warped = sample(batch.moving_labels[i : i + 1].float().to(device), fixed_to_moving, mode="nearest")
        fixed_labels = batch.fixed_labels[i : i + 1].to(device)
        before.append(mean_dice(batch.moving_labels[i : i + 1].to(device), fixed_labels, below))
        after.append(mean_dice(warped.round().long(), fixed_labels, below))
    model.train(was_training)
    return {"val_dice_before": sum(before) / pairs, "val_dice_after": sum(after) / pairs}


def _corrected_ema(decay: float):
    """The ``multi_avg_fn`` of an exponential moving average without the first step's bias: after
    ``t`` steps each step ``i``'s weights count ``decay ** (t - i)``, normalised to sum 1.

    An average seeded with the first step's weights (``swa_utils.get_ema_multi_avg_fn``) keeps
    ``decay ** t`` of them: 42 % after 430 steps at 0.998, so a run fine-tuned away from its
    starting weights is judged in large part on them. Integer buffers take the last step's value.
    """

    @torch.no_grad()
    def update(averaged: list, current: list, averaged_steps: torch.Tensor) -> None:
        weight = (1 - decay) / (1 - decay ** (int(averaged_steps) + 1))
        for kept, new in zip(averaged, current):
            if kept.is_floating_point():
                kept.lerp_(new, weight)
            else:
                kept.copy_(new)

    return update


class _Trainee(NamedTuple):
    """What a run trains and keeps: the network, its optimizer, the weights' average (None
    without ``ema_decay``) and the step they are at."""

    model: nn.Module
    optimizer: torch.optim.Adam
    average: Optional[AveragedModel]
    step: int

    @property
    def kept(self) -> nn.Module:
        """The network that stands for the run: the average once it holds a step."""
        return self.average.module if self.averaging else self.model

    @property
    def averaging(self) -> bool:
        """Whether the average holds a step (none before ``ema_start``, none without ``ema_decay``)."""
        return self.average is not None and int(self.average.n_averaged) > 0


def _trainee(config: TrainConfig, device: torch.device, output: Path) -> _Trainee:
    """The network, its optimizer and average on ``device`` and the step they are at: resumed
    from ``output``'s checkpoint, else started from ``config.init_from``'s weights (step 0), else new."""
    model = build_carl(
        len(config.input_shape), config.input_shape, config.variant, config.fourth_step, config.width, config.first_step,
        config.box,
    )
    set_box(model, config.box)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    average = None
    if config.ema_decay:
        average = AveragedModel(model, multi_avg_fn=_corrected_ema(config.ema_decay), use_buffers=True)
    if (output / CHECKPOINT).exists():
        state = load_checkpoint(output / CHECKPOINT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if average is not None and "average" in state:
            average.module.load_state_dict(state["average"])
            average.n_averaged.fill_(int(state["averaged_steps"]))
        return _Trainee(model, optimizer, average, int(state["step"]))
    if config.init_from:
        state = load_checkpoint(Path(config.init_from))
        model.load_state_dict(checkpoint_weights(state) if "model" in state and "optimizer" in state else state, strict=True)
    return _Trainee(model, optimizer, average, 0)


def _check_settings(config: TrainConfig) -> None:
    """Refuse the settings that only synthesised brains can serve, for other data, and an
    ``ema_start`` without an average to start."""
    if config.box != tuple(config.input_shape) and config.data != "synthseg3d":
        raise ValueError(f"train(): box_shape is for synthseg3d boxes, not {config.data!r} data; leave it empty")
    if config.mask_similarity and config.data != "synthseg3d":
        raise ValueError(f"train(): mask_similarity is for synthseg3d data, whose cuts the data source knows, "
                         f"not {config.data!r} data; leave it false")
    if config.label_weight and config.data != "synthseg3d":
        raise ValueError(f"train(): label_weight is for synthseg3d data, whose label maps cover every image, "
                         f"not {config.data!r} data; leave it 0")
    if config.ema_start and not config.ema_decay:
        raise ValueError(f"train(): ema_start (the step after which the weights are averaged) needs ema_decay > 0, "
                         f"got ema_start {config.ema_start} with ema_decay 0")


def _train_step(config: TrainConfig, step: int, seed: int, source, loss_model: nn.Module,
                optimizer: torch.optim.Optimizer, device: torch.device) -> Tuple[str, LossTerms]:
    """One optimisation step on the step's own batch and ``seed`` (:func:`_step_seed`: exact
    resume); returns the phase and the loss terms."""
    torch.manual_seed(seed)
    batch = source.batch(config.batch_size, torch.Generator().manual_seed(seed))
    phase = "diffusion" if step < config.diffusion_steps else "gradicon"
    optimizer.zero_grad()
    masks = _masks(batch, device) if config.mask_similarity else (None, None)
    labels = one_hot_labels(batch, device) if config.label_weight else ()
    terms = loss_model(batch.moving.to(device), batch.fixed.to(device), phase, *masks, *labels)
    terms.total.backward()
    optimizer.step()
    return phase, terms


def _record(step: int, phase: str, terms: LossTerms, seconds: float, hardware: str) -> Dict[str, Any]:
    """A step's log line."""
    return {
        "step": step,
        "phase": phase,
        "loss": float(terms.total.detach()),
        "similarity": float(terms.similarity.detach()),
        "regularity": float(terms.regularity.detach()),
        **({} if terms.supervision is None else {"supervision": float(terms.supervision.detach())}),
        "seconds": seconds,
        "device": hardware,
    }


def train(
    config: TrainConfig,
    device: torch.device = torch.device("cpu"),
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
    max_steps_this_run: Optional[int] = None,
    max_seconds_this_run: Optional[float] = None,
) -> torch.nn.Module:
    """Train (or resume from ``output/checkpoint.pt``) up to ``config.steps`` steps.

    ``max_steps_this_run`` stops early after that many steps, ``max_seconds_this_run`` after the
    step during which that much wall time has passed (a burst on a lent GPU); the checkpoint is
    then written, in the same format on any device, so that the run resumes anywhere. Returns the
    network that stands for the run (the weights' average with ``ema_decay``).
    """
    rank, world = _rank_and_world()
    output = Path(config.output)
    torch.manual_seed(config.seed)
    _check_settings(config)
    trainee = _trainee(config, device, output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(asdict(config), indent=2))
        _truncate_log(output / "log.jsonl", trainee.step)
    source = _make_source(config, "train")
    validation = _make_source(config, "validation") if config.validate_every and rank == 0 else None
    loss_model: nn.Module = PhaseObjective(trainee.model, config.lmbda, config.sigma, config.label_weight)
    if world > 1:
        loss_model = DistributedDataParallel(loss_model)
    start = trainee.step
    end = config.steps if max_steps_this_run is None else min(config.steps, start + max_steps_this_run)
    reporter = StageReporter("training", end - start, progress, should_cancel)
    deadline = None if max_seconds_this_run is None else time.monotonic() + max_seconds_this_run
    # each step's record names its device: a run may go on elsewhere (a GPU burst, then the CPU)
    hardware = describe_device(device)
    trainee.model.train()
    log = open(output / "log.jsonl", "a") if rank == 0 else None
    try:
        for step in range(start, end):
            began = time.perf_counter()
            seed = _step_seed(config.seed, step, rank, world)
            phase, terms = _train_step(config, step, seed, source, loss_model, trainee.optimizer, device)
            if trainee.average is not None and step >= config.ema_start:
                trainee.average.update_parameters(trainee.model)
            done = step + 1
            stopping = done == end or _time_is_up(deadline, world, device)
            if log is not None:
                record = _record(done, phase, terms, time.perf_counter() - began, hardware)
                if done % config.checkpoint_every == 0 or stopping:
                    _save(trainee, done, config, output)
                    log.flush()
                    plot_log(output / "log.jsonl", output / "loss.png")
                if validation is not None and done % config.validate_every == 0:
                    below = BRAIN_LABEL_LIMIT if config.data == "synthseg3d" else None
                    record.update(validate(trainee.kept, validation, config.validation_pairs, device, below))
                log.write(json.dumps(record) + "\n")
                log.flush()
            # the bar counts this run's steps (its ETA); the message names the run's own step
            reporter.report(done - start, f"step {done}/{config.steps}, {phase} loss {float(terms.total.detach()):.4f}")
            if stopping:
                break
    finally:
        if log is not None:
            log.close()
    if world > 1:
        # DDP keeps parameters equal; BatchNorm statistics are rank 0's, as its forward broadcasts them
        for buffer in trainee.kept.buffers():
            dist.broadcast(buffer, 0)
    return trainee.kept


def _time_is_up(deadline: Optional[float], world: int, device: torch.device) -> bool:
    """Whether the run's wall-time budget is spent. Rank 0's clock decides for every rank: ranks
    must stop after the same step (a rank alone in the next all-reduce would wait for ever)."""
    if deadline is None:
        return False
    flag = torch.tensor([float(time.monotonic() >= deadline)], device=device)
    if world > 1:
        dist.broadcast(flag, 0)
    return bool(flag.item())


def plot_log(log_path: Path, png_path: Path) -> bool:
    """Loss, similarity, regularity (and label supervision) and validation Dice against the step;
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    figure, (losses, dice) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in records]
    for key in ("loss", "similarity", "regularity", "supervision"):
        if all(key in r for r in records):
            losses.plot(steps, [r[key] for r in records], label=key, lw=0.8)
    losses.set_yscale("log")
    losses.set_xlabel("step")
    losses.legend()
    validated = [r for r in records if "val_dice_after" in r]
    if validated:
        dice.plot([r["step"] for r in validated], [r["val_dice_after"] for r in validated], "o-", label="after")
        dice.plot([r["step"] for r in validated], [r["val_dice_before"] for r in validated], "--", label="before")
        dice.legend()
    dice.set_xlabel("step")
    dice.set_title("validation Dice")
    figure.tight_layout()
    with atomic_outputs() as reserve:
        figure.savefig(reserve(png_path), format="png", dpi=80)
    plt.close(figure)
    return True


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint (an interrupted run logged them; they are redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    with atomic_outputs() as reserve:
        reserve(path).write_text("".join(line + "\n" for line in kept))


def _save(trainee: _Trainee, step: int, config: TrainConfig, output: Path) -> None:
    state = {"model": trainee.model.state_dict(), "optimizer": trainee.optimizer.state_dict(), "step": step,
             "config": asdict(config)}
    if trainee.averaging:
        state.update(average=trainee.average.module.state_dict(), averaged_steps=int(trainee.average.n_averaged))
    with atomic_outputs() as reserve:
        torch.save(state, reserve(output / CHECKPOINT))
        torch.save(checkpoint_weights(state), reserve(output / "model.pt"))
