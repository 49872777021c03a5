"""Shared fixtures: the real images in ../shared/data, and the reference implementation."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Two threads, as on the project's machines, shared among pytest-xdist's workers; results must not
# depend on it. The processes that tests start (workers, command lines) take as many: with more
# threads than cores, OpenMP's waiting threads spin against the working ones (a test that starts a
# worker took three times as long).
THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(THREADS)

#: why a test marked ``cuda`` is skipped (also where CI runs: it has no GPU, a skip is not a failure)
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (Testing/test_cuda.py, run by `make gpu-check`) are skipped without a GPU."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def shared_data_path(*parts: str) -> Path:
    """A file under ../shared/data: skipped when absent (a user's clone), a failure in CI."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"real test data not found: {path} (../shared/data beside the repository)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def monai_pairs_csv(tmp_path: Path) -> Path:
    """Training pairs as a user writes them (a CSV): the MONAI anatomical pair and its label maps."""
    folder = shared_data_path("tiny_fixtures", "monai_anatomical_pair")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "moving,fixed,moving_labels,fixed_labels\n"
        f"{folder / 'reoriented_anat_moved.nii'},{folder / 'anatomical.nii'},"
        f"{folder / 'reoriented_anat_moved_label.nii.gz'},{folder / 'anatomical_label.nii.gz'}\n"
    )
    return csv_path


def load_bench(name: str) -> ModuleType:
    """The benchmark script ``bench/<name>.py`` as a module, so that tests rerun its own code."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_module(name: str):
    """An optional test dependency (installed by `make test`): skipped when absent, a failure in CI."""
    try:
        return __import__(name)
    except ImportError as err:
        message = f"{name} is not installed ({err}); `make test` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def reference():
    """The reference CARL package (icon_registration), built on the CPU."""
    from reference_oracle import load_reference

    return load_reference()
