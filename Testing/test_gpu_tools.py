"""The GPU tools on the CPU: `make gpu-check` without CUDA, the skipped cuda tests, and the carry's
packing and size accounting (bench/gpu_carry.py) on small inputs, without the network."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import conftest
from conftest import REPO, load_bench, shared_data_path

gpu_carry = load_bench("gpu_carry")
#: a small shared library with machine code and relocations (torch's Python extension stub, ~9 kB)
SMALL_LIBRARY = Path(torch._C.__file__)
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU path runs instead")


@needs_no_cuda
def test_gpu_check_without_cuda_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out)],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == (f"gpu-check: no CUDA device (torch {torch.__version__}, cuda available: False); "
                                "nothing measured\n")
    assert not out.exists()


@needs_no_cuda
def test_cuda_tests_are_collected_and_skipped_with_the_reason_also_in_ci():
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-q", "-p", "no:cacheprovider", "Testing/test_cuda.py"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, CI="true"))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    skipped = [line for line in completed.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all(line.endswith(conftest.NO_CUDA) for line in skipped), completed.stdout
    count = sum(int(line.split("[")[1].split("]")[0]) for line in skipped)
    assert count >= 6 and f"{count} skipped" in completed.stdout and "passed" not in completed.stdout


def test_the_hook_skips_only_tests_marked_cuda_and_only_without_cuda(monkeypatch):
    def item(marked: bool):
        markers = []
        return SimpleNamespace(markers=markers, add_marker=markers.append,
                               get_closest_marker=lambda name: object() if marked and name == "cuda" else None)

    items = [item(True), item(False)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    conftest.pytest_collection_modifyitems(None, items)
    assert [m.kwargs["reason"] for m in items[0].markers] == [conftest.NO_CUDA] and items[1].markers == []
    items = [item(True)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    conftest.pytest_collection_modifyitems(None, items)
    assert items[0].markers == []


def test_tree_size_counts_tracked_and_unignored_files_only(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "tracked.bin").write_bytes(b"x" * 1000)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "big.bin").write_bytes(b"x" * 50_000)
    git("add", ".gitignore", "tracked.bin")
    (tmp_path / "untracked.txt").write_bytes(b"y" * 300)
    assert gpu_carry.tree_bytes(tmp_path) == len("ignored/\n") + 1000 + 300
    assert gpu_carry.folder_bytes(tmp_path / "ignored") == 50_000
    assert gpu_carry.folder_bytes(tmp_path / "absent") == 0


def test_the_limit_is_60_mib_together_and_the_error_names_the_sizes():
    limit = 60 * 2**20
    assert gpu_carry.LIMIT_BYTES == limit
    assert gpu_carry.size_problem(33_600_000, limit - 33_600_000) is None
    message = gpu_carry.size_problem(33_600_000, 32_000_000)
    assert message == ("gpu-carry: tree 33.6 MB (32.0 MiB) + carry 32.0 MB (30.5 MiB) = 65.6 MB (62.6 MiB), "
                       "over the 60 MiB limit by 2.7 MB (2.6 MiB)")
    assert "\n" not in message


def test_relocation_columns_round_trip():
    records = b"".join(
        (4096 + 8 * i).to_bytes(8, "little") + (8).to_bytes(8, "little") + (2**64 - 1 - i).to_bytes(8, "little")
        for i in range(100)
    )
    columns = gpu_carry.to_columns(records)
    assert len(columns) == len(records) and columns[:16] == (4096).to_bytes(8, "little") + (8).to_bytes(8, "little")
    assert gpu_carry.from_columns(columns) == records


def test_a_shared_library_packs_into_segments_and_unpacks_byte_for_byte():
    data = SMALL_LIBRARY.read_bytes()
    sections = gpu_carry.elf_sections(data)
    assert {".text", ".rela.dyn", ".dynsym"} <= set(sections)
    assert all(offset + size <= len(data) for offset, size in sections.values())
    segments = gpu_carry.library_segments(data)
    assert segments[0].start == 0 and segments[-1].end == len(data)
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    assert {s.kind for s in segments} == {"plain", "columns", "x86"}
    parts = [gpu_carry.pack_segment(data, segment, preset=1) for segment in segments]
    assert gpu_carry.unpack_segments(parts, segments) == data
    with pytest.raises(ValueError, match="elf_sections\\(\\): expected a little-endian ELF64 file"):
        gpu_carry.elf_sections(b"MZ" + bytes(100))


def test_a_packed_wheel_and_a_pure_wheel_unpack_into_a_site_folder(tmp_path):
    library = SMALL_LIBRARY
    binary, pure = tmp_path / "fake-1.0-cp312-abi3-manylinux.whl", tmp_path / "carry" / "wheels" / "pure-1.0-py3-none-any.whl"
    pure.parent.mkdir(parents=True)
    with zipfile.ZipFile(binary, "w") as archive:
        archive.writestr("fake/__init__.py", "VALUE = 1\n")
        archive.writestr("fake/_fake.so", library.read_bytes())
    with zipfile.ZipFile(pure, "w") as archive:
        archive.writestr("pure/__init__.py", "VALUE = 2\n")
    manifest = gpu_carry.pack_wheel(binary, tmp_path / "carry" / "fake", "fake/_fake.so", preset=1)
    assert manifest["library"] == "fake/_fake.so" and (tmp_path / "carry" / "fake" / "python.tar.xz").exists()
    assert not gpu_carry.pack_if_changed(binary, tmp_path / "carry" / "fake", "fake/_fake.so")
    site = tmp_path / "site"
    gpu_carry.unpack_site(tmp_path / "carry", site)
    assert (site / "fake" / "_fake.so").read_bytes() == library.read_bytes()
    assert (site / "fake" / "__init__.py").read_text() == "VALUE = 1\n" and (site / "pure" / "__init__.py").exists()
    (tmp_path / "carry" / "fake" / "library.0.xz").write_bytes(
        gpu_carry.pack_segment(b"\0" * 10, gpu_carry.Segment(0, 10, "plain"), preset=1))
    with pytest.raises((RuntimeError, ValueError)):
        gpu_carry.unpack_site(tmp_path / "carry", tmp_path / "site2")


def test_a_reduced_label_map_reads_as_the_original_on_the_training_grid(tmp_path):
    """One map through bench/gpu_carry.py's reduction: the training code reads the same labels."""
    source = tmp_path / "source"
    source.mkdir()
    folder = shared_data_path("synthseg_label_maps")
    for name in ("labels_table.txt", "training_seg_16.nii.gz"):
        os.symlink(folder / name, source / name)
    assert gpu_carry.reduce_label_maps(source, tmp_path / "reduced", (64, 72, 64), 3.0) == 1
    reduced = tmp_path / "reduced" / "training_seg_16.nii.gz"
    assert reduced.stat().st_size < (folder / "training_seg_16.nii.gz").stat().st_size / 10
    assert (tmp_path / "reduced" / "labels_table.txt").read_text() == (folder / "labels_table.txt").read_text()


def test_a_burst_config_starts_from_shipped_weights_never_from_a_run_checkpoint(tmp_path):
    """The capture-range recipe starts from the shipped weights (in the tree, so on the GPU
    machine too); a recipe starting from a run's checkpoint (which stays where it trained) starts
    from scratch there. Both load as training configs with the carry's data folder."""
    from carlreg.train import TrainConfig

    capture = gpu_carry.write_train_config(gpu_carry.TRAIN_RECIPE, tmp_path / "capture.json", ".gpu-carry/data/x")
    assert capture["init_from"] == "CARLRegistration/carlreg/weights/carl-brain-3d.pt"
    config = TrainConfig.from_dict(capture)
    assert config.box == (96, 104, 88) and config.data_folder == ".gpu-carry/data/x"
    # bench/gpu_session.sh names the runs after the recipe and trains its displacement-only twin after it, to its step
    name = Path(config.output).name
    assert config.output == f"runs/{gpu_carry.TRAIN_RECIPE.stem}" and name.startswith("carl-brain-3d-")
    twin = TrainConfig.from_dict(json.loads((REPO / "weights" / "training" / f"unet-{name[len('carl-'):]}.json").read_text()))
    same = ("box", "max_shift", "shifts", "field_of_view_mm", "mask_similarity", "label_weight", "ema_decay", "seed", "background")
    assert [getattr(twin, key) for key in same] == [getattr(config, key) for key in same]
    assert twin.first_step == "unet"
    dark = gpu_carry.write_train_config(REPO / "weights" / "training" / "carl-brain-3d-dark.json", tmp_path / "dark.json", "d")
    assert dark["init_from"] == "" and TrainConfig.from_dict(dark).box == (64, 72, 64)
