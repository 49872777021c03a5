"""The one place that picks the device and the numeric precision.

An explicit choice wins; ``"auto"`` takes CUDA, then Apple MPS, then the CPU.
Precision ``"bf16"`` runs convolutions and attention scores in bfloat16 under
``torch.autocast`` (maps, sampling and the attention's weighted sums stay
float32); it is for inference on hardware with native bfloat16 support.
"""
from __future__ import annotations

import contextlib
import platform
from typing import ContextManager, Union

import torch

__all__ = ["PRECISIONS", "resolve_device", "describe_device", "bf16_supported", "resolve_precision", "precision_context",
           "cpu_fold", "fold_rows", "unfold_rows"]

PRECISIONS = ("fp32", "bf16", "auto")


#: at most this many batch entries in :func:`cpu_fold` (their backward holds as many gradient copies)
MAX_CPU_FOLD = 8


def cpu_fold(tensor: torch.Tensor, batch: int) -> int:
    """Into how many batch entries to fold the work of ``batch`` items on ``tensor``'s device so
    that every CPU thread gets some: torch spreads the CPU kernels of 3-D sampling, of 2-D
    sampling's backward and of fused attention's backward over the batch (and heads) only, so a
    single image runs on one thread. 1 (no fold) on other devices or for a batch of several."""
    if tensor.device.type != "cpu" or batch != 1:
        return 1
    return min(torch.get_num_threads(), MAX_CPU_FOLD)


def fold_rows(rows: torch.Tensor, fold: int) -> torch.Tensor:
    """``(N, *R)`` rows → ``(fold, ⌈N / fold⌉, *R)`` batch entries, zero rows appended to fill the last."""
    count = rows.shape[0]
    per_entry = -(-count // fold)
    if per_entry * fold != count:
        rows = torch.cat([rows, rows.new_zeros((per_entry * fold - count, *rows.shape[1:]))])
    return rows.reshape(fold, per_entry, *rows.shape[1:])


def unfold_rows(folded: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of :func:`fold_rows`: ``(fold, per_entry, *R)`` → the first ``count`` rows, ``(count, *R)``."""
    return folded.reshape(-1, *folded.shape[2:])[:count]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(choice: Union[str, torch.device, None] = "auto") -> torch.device:
    """The device to run on.

    Args:
        choice: ``"auto"`` (or None), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``.
    Raises:
        ValueError: the choice is unknown or that device is not available here.
    """
    if choice is None or choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"resolve_device(): expected auto, cpu, cuda[:N] or mps, got {choice!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("resolve_device(): CUDA was asked for, but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"resolve_device(): {device} was asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist"
            )
    elif device.type == "mps" and not _mps_available():
        raise ValueError("resolve_device(): MPS was asked for, but Apple MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"resolve_device(): expected auto, cpu, cuda[:N] or mps, got {choice!r}")
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:  # Linux names the model there; platform does not
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    """``device`` in words, for logs and model cards: the GPU's name, or the CPU's thread count."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"CPU {_cpu_name()}, {torch.get_num_threads()} threads"
    return device.type.upper()


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX-512 BF16 or AMX; CUDA: Ampere or newer)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"``: ``"auto"`` is fp32 (bf16 is opt-in, it changes results slightly)."""
    if precision not in PRECISIONS:
        raise ValueError(f"resolve_precision(): precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"resolve_precision(): bf16 was asked for, but {device} has no native bfloat16 support")
    return "bf16" if precision == "bf16" else "fp32"


def precision_context(precision: str, device: torch.device) -> ContextManager:
    """A context that runs the network at ``precision`` (``"fp32"`` or ``"bf16"``) on ``device``."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
