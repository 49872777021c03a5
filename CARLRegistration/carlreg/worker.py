"""Running ``carl-register`` in a worker process: progress without blocking, cancel at once.

For GUIs (the Slicer module polls :meth:`WorkerJob.poll` from a timer) and for batch
scripts. The worker is ``python -m carlreg.cli register ... --progress json``; its stdout lines
are progress events, its last stderr line the error of a failed run. Cancelling kills the
worker's whole process group, so nothing keeps running; the command line's atomic outputs
mean a killed run leaves no partial file.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["WorkerJob"]


class WorkerJob:
    """One ``carl-register`` run in its own process (and process group).

    Args:
        arguments: the command line's arguments, without ``--progress``.
        python: the interpreter to run (Slicer's ``PythonSlicer``; ``sys.executable`` by default).
    """

    def __init__(self, arguments: Sequence[str], python: Optional[str] = None, env: Optional[Dict[str, str]] = None):
        self.command = [python or sys.executable, "-m", "carlreg.cli", "register", *map(str, arguments), "--progress", "json"]
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._stderr: List[str] = []
        self._threads: List[threading.Thread] = []
        self.cancelled = False

    def start(self) -> "WorkerJob":
        kwargs = {"start_new_session": True} if os.name == "posix" else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, **kwargs
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                continue  # not a progress line (a library's stray output)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            if line.strip():
                self._stderr.append(line.rstrip())

    def poll(self) -> List[dict]:
        """The progress events received since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def returncode(self) -> Optional[int]:
        """None while running; then 0 (success), 2 (bad input), 130 (cancelled) or another failure."""
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: Optional[float] = None) -> int:
        code = self.process.wait(timeout)
        for thread in self._threads:
            thread.join(timeout=1.0)
        return code

    @property
    def error(self) -> str:
        """The worker's one-line error (its last stderr line), or "" after success."""
        if self.returncode in (None, 0):
            return ""
        return self._stderr[-1] if self._stderr else f"the registration worker stopped with code {self.returncode}"

    def cancel(self, grace_seconds: float = 1.0) -> None:
        """Stop the worker and every process it started: SIGTERM, then SIGKILL after ``grace_seconds``."""
        self.cancelled = True
        if self.process is None or self.process.poll() is not None:
            return
        if os.name == "posix":
            group = os.getpgid(self.process.pid)
            os.killpg(group, signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.process.poll() is None:
                os.killpg(group, signal.SIGKILL)
        else:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
        self.wait()
