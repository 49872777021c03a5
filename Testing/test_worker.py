"""carl-register in a worker process: progress, cancel within 2 s, one-line errors."""
from __future__ import annotations

import json
import time

import pytest
import torch

from carlreg import build_carl
from carlreg.worker import WorkerJob
from conftest import shared_data_path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    torch.save(build_carl(3, (40, 40, 40), width=0.125).state_dict(), folder / "tiny.pt")
    (folder / "tiny.json").write_text(json.dumps({"architecture": {"dimension": 3, "input_shape": [40, 40, 40], "width": 0.125}}))
    return folder / "tiny.pt"


def _arguments(tmp_path, model, *extra):
    folder = shared_data_path("tiny_fixtures", "monai_anatomical_pair")
    return ["--moving", folder / "reoriented_anat_moved.nii", "--fixed", folder / "anatomical.nii", "--model", model,
            "--out-transform", tmp_path / "t.h5", "--out-warped", tmp_path / "w.nii.gz", *extra]


def _run_until_done(job, timeout=120.0):
    events, deadline = [], time.monotonic() + timeout
    while job.returncode is None and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.05)
    job.wait(5)
    return events + job.poll()


def test_worker_reports_progress_and_writes_outputs(tmp_path, tiny_model):
    job = WorkerJob(_arguments(tmp_path, tiny_model)).start()
    events = _run_until_done(job)
    assert job.returncode == 0 and job.error == ""
    stages = [e["stage"] for e in events]
    assert stages[0] == "loading" and "registration" in stages and stages[-1] == "done"
    assert "lncc_after" in events[-1]["metrics"]
    assert (tmp_path / "t.h5").is_file() and (tmp_path / "w.nii.gz").is_file()


@pytest.mark.parametrize("options, stage", [
    (("--io-mode", "network", "--io-steps", "500"), "instance optimization"),
    # a fine grid, so that the refinement lasts well beyond the cancel
    (("--io-mode", "svf", "--refine-spacing", "1"), "refinement"),
])
def test_cancel_stops_the_worker_within_two_seconds_and_leaves_no_output(tmp_path, tiny_model, options, stage):
    job = WorkerJob(_arguments(tmp_path, tiny_model, *options)).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(e["stage"] == stage for e in job.poll()):
            break
        assert job.returncode is None, job.error
        time.sleep(0.05)
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 2.0
    assert job.returncode not in (None, 0) and job.cancelled
    assert list(tmp_path.iterdir()) == []


def test_a_failing_worker_surfaces_its_one_line_error(tmp_path, tiny_model):
    arguments = _arguments(tmp_path, tiny_model)
    arguments[1] = tmp_path / "absent.nii.gz"
    job = WorkerJob(arguments).start()
    _run_until_done(job)
    assert job.returncode == 2
    assert job.error.startswith("carl-register: read_image(): moving image not found")
    assert list(tmp_path.iterdir()) == []
