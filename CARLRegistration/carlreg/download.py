"""Fetching a model's weights file: atomically, with progress, cancel and its SHA256 (no torch).

Used by :mod:`carlreg.registry` for models whose card gives a ``url`` (uniCARL). The file is
written under a temporary name in the target's folder and renamed only when complete, so an
interrupted or cancelled download leaves nothing in the cache.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .progress import CancelCheck, ProgressCallback, StageReporter

__all__ = ["DownloadError", "download_file"]

#: bytes read at a time (also the granularity of progress and cancel)
BLOCK = 1 << 20
#: seconds without an answer before a connection attempt or a read gives up
TIMEOUT_S = 60


class DownloadError(OSError):
    """The server could not be reached or the transfer broke off."""


def download_file(
    url: str,
    target: Path,
    expected_size: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
) -> str:
    """Download ``url`` to ``target`` (renamed into place once complete); returns its SHA256.

    Progress is reported in MiB under the stage ``download`` (the server's length, else
    ``expected_size``); :class:`carlreg.progress.Cancelled` is raised between blocks when
    ``should_cancel()`` is true.

    Raises:
        DownloadError: unreachable server, HTTP error or a broken transfer (nothing is kept).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            length = int(response.headers.get("Content-Length") or expected_size or 0)
            reporter = StageReporter("download", max(1, round(length / BLOCK)), progress, should_cancel)
            done = 0
            for block in iter(lambda: response.read(BLOCK), b""):
                out.write(block)
                digest.update(block)
                done += len(block)
                reporter.report(min(reporter.total, done // BLOCK), f"{done / BLOCK:.0f} of {length / BLOCK:.0f} MiB")
            if length and done != length:
                raise DownloadError(f"the transfer broke off after {done} of {length} bytes")
        os.replace(temporary, target)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(str(reason)) from err
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return digest.hexdigest()
