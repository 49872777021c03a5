"""Progress reports and cancellation, shared by the engine, the command line and Slicer.

Long calls take ``progress`` (a callable receiving :class:`Progress`) and
``should_cancel`` (a callable returning True to stop); they raise
:class:`Cancelled` at the next step boundary once ``should_cancel()`` is true.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

__all__ = ["Progress", "ProgressCallback", "CancelCheck", "Cancelled", "StageReporter"]


@dataclass(frozen=True)
class Progress:
    """One report: ``step`` of ``total`` in ``stage``, with the estimated seconds left."""

    stage: str
    step: int
    total: int
    fraction: float
    eta_s: Optional[float]
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised by a long call when its ``should_cancel`` check returned True."""


class StageReporter:
    """Reports the steps of one stage and checks for cancellation between them.

    The ETA is the mean time per completed step times the steps left.
    """

    def __init__(
        self,
        stage: str,
        total: int,
        progress: Optional[ProgressCallback] = None,
        should_cancel: Optional[CancelCheck] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage = stage
        self.total = max(0, int(total))
        self.progress = progress
        self.should_cancel = should_cancel
        self.clock = clock
        self.start = clock()

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` if cancellation was asked for."""
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"{self.stage}: cancelled")

    def report(self, step: int, message: str = "") -> None:
        """Report that ``step`` steps are done, then check for cancellation."""
        if self.progress is not None:
            elapsed = self.clock() - self.start
            eta = elapsed / step * (self.total - step) if step > 0 else None
            fraction = step / self.total if self.total else 1.0
            self.progress(Progress(self.stage, step, self.total, fraction, eta, message))
        self.check_cancel()
