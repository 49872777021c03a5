"""Weights downloaded on first use (uniCARL's way), exercised for real against a local HTTP server.

The server on 127.0.0.1 serves a small CARL network's state_dict, as a publisher serves a weights
file; its model card gives the url and no SHA256 (uniCARL's publisher gives none), so the first
download records one.
"""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from carlreg import build_carl, registry
from carlreg.models import load_model
from carlreg.progress import Cancelled

ARCHITECTURE = {"dimension": 3, "input_shape": [40, 40, 40], "width": 0.125}


class _Server:
    """Serves ``payload`` at /weights; counts requests; ``truncate`` sends half the body only."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.requests, self.truncate = payload, 0, False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                body = outer.payload[: len(outer.payload) // 2] if outer.truncate else outer.payload
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def published(tmp_path, monkeypatch):
    """A model card with a url (no SHA256) in a registry folder, a cache folder, the server."""
    torch.manual_seed(0)
    model = build_carl(3, (40, 40, 40), width=0.125).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    server = _Server((tmp_path / "weights.pt").read_bytes())
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    shipped.mkdir()
    card = {"architecture": ARCHITECTURE, "file": "remote.pt", "url": server.url, "size_bytes": len(server.payload)}
    (shipped / "remote.json").write_text(json.dumps(card))
    monkeypatch.setattr(registry, "WEIGHTS_DIR", shipped)
    monkeypatch.setattr(registry, "CACHE_DIR", cache)
    yield model, server, shipped, cache
    server.stop()


def test_first_use_downloads_and_records_the_checksum_then_the_cache_serves(published):
    model, server, _, cache = published
    reports = []
    loaded = load_model("remote", device="cpu", progress=reports.append)
    assert server.requests == 1 and (cache / "remote.pt").read_bytes() == server.payload
    assert (cache / "remote.pt.sha256").read_text().strip() == registry.sha256_of(cache / "remote.pt")
    assert reports and {r.stage for r in reports} == {"download"} and reports[-1].fraction == 1.0
    image = torch.rand(1, 1, 40, 40, 40)
    with torch.no_grad():
        assert torch.allclose(loaded(image, image), model(image, image), atol=1e-5)
    server.stop()  # no network from now on
    load_model("remote", device="cpu")
    assert server.requests == 1


def test_a_changed_cached_file_is_refused(published):
    _, server, _, cache = published
    load_model("remote", device="cpu")
    with open(cache / "remote.pt", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="is not the file first downloaded for 'remote'.*delete it to download it again"):
        load_model("remote", device="cpu")
    assert server.requests == 1


def test_an_interrupted_or_cancelled_download_leaves_nothing_in_the_cache(published):
    _, server, _, cache = published
    server.truncate = True
    with pytest.raises(ValueError, match="cannot download 'remote'"):
        load_model("remote", device="cpu")
    assert not cache.exists() or list(cache.iterdir()) == []
    server.truncate = False
    with pytest.raises(Cancelled):
        load_model("remote", device="cpu", should_cancel=lambda: True)
    assert list(cache.iterdir()) == []


def test_an_unreachable_url_gives_one_line_and_exit_code_2(published, tmp_path):
    _, server, shipped, cache = published
    server.stop()
    image = tmp_path / "image.nii.gz"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(torch.rand(40, 40, 40).numpy()), str(image))
    environment = dict(os.environ, CARLREG_WEIGHTS=str(shipped), CARLREG_CACHE=str(cache))
    completed = subprocess.run(
        [sys.executable, "-m", "carlreg.cli", "register", "--moving", image, "--fixed", image, "--model", "remote",
         "--device", "cpu", "--out-transform", tmp_path / "t.h5"], capture_output=True, text=True, env=environment)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"carl-register: load_model(): cannot download 'remote' from {server.url}")
    assert f"place the file at {cache / 'remote.pt'}" in lines[0]
    assert not (tmp_path / "t.h5").exists() and (not cache.exists() or list(cache.iterdir()) == [])


def test_the_worker_reports_the_download_as_a_stage(published, tmp_path):
    """What the Slicer module sees: the worker process downloads on first use and its progress
    events carry the stage ``download`` before the registration's own."""
    import SimpleITK as sitk

    from carlreg.worker import WorkerJob

    _, server, shipped, cache = published
    image = tmp_path / "image.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(torch.rand(40, 40, 40).numpy()), str(image))
    environment = dict(os.environ, CARLREG_WEIGHTS=str(shipped), CARLREG_CACHE=str(cache))
    job = WorkerJob(["--moving", image, "--fixed", image, "--model", "remote", "--device", "cpu",
                     "--out-transform", tmp_path / "t.h5"], env=environment).start()
    assert job.wait(timeout=300) == 0, job.error
    stages = [event["stage"] for event in job.poll()]
    assert stages[0] == "download" and stages.index("registration") > stages.index("download")
    assert server.requests == 1 and (cache / "remote.pt").is_file()
