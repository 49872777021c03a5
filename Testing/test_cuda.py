"""The engine on an NVIDIA GPU: tests marked ``cuda``, which `make gpu-check` runs (bench/gpu_check.py).

Without CUDA they are collected and skipped (Testing/conftest.py; CI has no GPU). Data are read
from ``$CARLREG_GPU_DATA`` when set (laid out as ../shared/data: the ``data/`` folder of
bench/gpu_carry.py's carry, for a lent machine without ../shared), else from ../shared/data.
Every float32 comparison runs with TF32 off (cuDNN's default is on).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from carlreg import build_carl
from carlreg.device import bf16_supported
from carlreg.geometry import canonical_orientation, to_network
from carlreg.inference import predict_maps
from carlreg.io import image_to_tensor, read_image
from carlreg.optimize import instance_optimize
from carlreg.preprocess import normalize_intensities
from conftest import load_bench, shared_data_path
from reference_oracle import build_reference, randomise_zero_initialised, reference_maps

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
MONAI_PAIR = ("tiny_fixtures", "monai_anatomical_pair")
#: the maps, unit frame: 10x the CPU oracle's 1e-5 (test_reference_oracle.py), as the two
#: implementations' GPU kernels round differently (cuDNN's algorithms; the reference's fused
#: memory-efficient attention against our blocked sums)
REFERENCE_TOLERANCE = 1e-4
float32_mode = load_bench("gpu_check").float32_mode


def gpu_data_path(*parts: str) -> Path:
    """A file under ``$CARLREG_GPU_DATA`` (set by ``bench/gpu_check.py --carry``), else under ../shared/data."""
    folder = os.environ.get(load_bench("gpu_check").DATA_VARIABLE)
    if not folder:
        return shared_data_path(*parts)
    path = Path(folder).joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} not found (CARLREG_GPU_DATA={folder}; `make gpu-carry` writes it)")
    return path


def monai_pair(shape) -> tuple:
    """The real MONAI pair (moving, fixed) as the engine prepares images: RAS, MR-normalised, resized to ``shape``."""
    folder = gpu_data_path(*MONAI_PAIR)
    tensors = []
    for name in ("reoriented_anat_moved.nii", "anatomical.nii"):
        image = canonical_orientation(read_image(folder / name))
        tensors.append(to_network(normalize_intensities(image_to_tensor(image), "mr", name), shape))
    return tensors[0], tensors[1]


@pytest.mark.parametrize("fourth_step", [False, True])
def test_maps_equal_the_reference_on_the_gpu(reference, fourth_step):
    """Same weights (the reference's seeded state, output convolutions and BatchNorm statistics
    randomised), a random and a real pair, both directions, both networks on the GPU."""
    shape = (48, 56, 64)
    torch.manual_seed(0)
    ref_model = build_reference(reference, "final_final", 3, shape, fourth_step)
    randomise_zero_initialised(ref_model)
    ours = build_carl(3, shape, fourth_step=fourth_step)
    ours.load_state_dict(ref_model.regis_net.state_dict(), strict=True)
    ref_model, ours = ref_model.to(CUDA).eval(), ours.to(CUDA).eval()
    real_moving, real_fixed = monai_pair(shape)
    generator = torch.Generator().manual_seed(2)
    moving = torch.cat([torch.rand((1, 1) + shape, generator=generator), real_moving]).to(CUDA)
    fixed = torch.cat([torch.rand((1, 1) + shape, generator=generator), real_fixed]).to(CUDA)
    with float32_mode(tf32=False):
        ref_ab, ref_ba = reference_maps(ref_model, moving, fixed)
        with torch.no_grad():
            ours_ab, ours_ba = ours(moving, fixed), ours(fixed, moving)
    assert ours_ab.device.type == "cuda" and ours_ab.shape == ref_ab.shape == (2, 3) + shape
    assert float((ref_ab - ref_model.identity_map).abs().max()) > 0.05, "the comparison must involve non-trivial maps"
    assert float((ours_ab - ref_ab).abs().max()) <= REFERENCE_TOLERANCE
    assert float((ours_ba - ref_ba).abs().max()) <= REFERENCE_TOLERANCE


def test_instance_optimization_on_the_gpu_restores_the_weights():
    torch.manual_seed(0)
    model = build_carl(3, (48, 48, 48), width=0.25).to(CUDA).eval()
    moving, fixed = (image.to(CUDA) for image in monai_pair((48, 48, 48)))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    reports = []
    maps = instance_optimize(model, moving, fixed, steps=10, learning_rate=1e-3, inverse=True, progress=reports.append)
    assert [r.step for r in reports] == list(range(0, 11))
    first, last = (float(r.message.split()[-1]) for r in (reports[1], reports[-1]))
    assert last < first, (first, last)
    assert maps.fixed_to_moving.device.type == "cuda" and maps.moving_to_fixed.shape == (1, 3, 48, 48, 48)
    state = model.state_dict()
    assert state.keys() == before.keys()
    for name, value in state.items():
        assert value.device.type == "cuda" and torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters()) and model.training is False


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's deterministic algorithms: some backward kernels add with atomics in a varying order."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _second_moments(optimizer_state: dict) -> float:
    """The sum of Adam's second-moment estimates over all parameters, after checking each took 3 steps."""
    states = optimizer_state["state"].values()
    assert states and all(float(state["step"]) == 3 for state in states)
    return sum(float(state["exp_avg_sq"].double().sum()) for state in states)


def test_training_on_the_gpu_resumes_exactly(tmp_path, deterministic_cudnn):
    """Three steps straight, or two then a resume, on the grid of the shipped model's recipe
    (the carry's label maps are resampled onto it); the GPU checkpoint loads on the CPU."""
    from carlreg.models import load_model
    from carlreg.train import TrainConfig, load_checkpoint, train

    recipe = json.loads(load_bench("gpu_carry").TRAIN_RECIPE.read_text())
    folder = gpu_data_path("synthseg_label_maps")

    def run(output, **limits):
        config = TrainConfig(
            data_folder=str(folder), input_shape=tuple(recipe["input_shape"]), spacing_mm=recipe["spacing_mm"],
            background=recipe["background"], max_shift=recipe["max_shift"], width=0.125, batch_size=1,
            diffusion_steps=1, steps=3, checkpoint_every=1, validate_every=0, output=str(output))
        with float32_mode(tf32=False):
            return train(config, CUDA, **limits)

    def losses(output):
        return [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()]

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    model = run(straight)
    run(interrupted, max_steps_this_run=2)
    assert load_checkpoint(interrupted / "checkpoint.pt")["step"] == 2
    run(interrupted)
    assert next(model.parameters()).device.type == "cuda"
    assert len(set(losses(straight))) == 3
    assert losses(interrupted) == pytest.approx(losses(straight), rel=1e-4, abs=1e-6)
    # Adam moves a weight by about ±lr per step whatever its gradient's size: where a gradient is
    # rounding noise its sign, and so the step, may differ between runs; elsewhere they agree
    learning_rate = TrainConfig().learning_rate
    final = [torch.load(path / "model.pt", map_location="cpu", weights_only=True) for path in (straight, interrupted)]
    differences = torch.cat([(final[0][name].float() - final[1][name].float()).abs().flatten() for name in final[0]])
    assert float(differences.max()) <= 3 * 2 * learning_rate
    # the optimizer state went on, not restarted: Adam's second moments sum three steps' squared
    # gradients (one, had the resume lost them); atomic adds left 3.7 % of the weights more than
    # 1e-6 apart on an H200 (2026-11-28), so the weights alone cannot show it. The moments too
    # differ by a few % there (3.1 %: the gradients' rounding noise, squared), far from the 1/3 of
    # a lost state
    moments = [_second_moments(load_checkpoint(path / "checkpoint.pt")["optimizer"]) for path in (straight, interrupted)]
    assert moments[1] == pytest.approx(moments[0], rel=0.1)
    assert load_model(interrupted / "checkpoint.pt", "cpu").input_spacing_mm == recipe["spacing_mm"]


def test_bf16_maps_stay_close_to_fp32_on_the_gpu():
    """The shipped brain model on the real pair: bf16 autocast against fp32, in voxels of its grid."""
    from carlreg.models import load_model

    if not bf16_supported(CUDA):
        pytest.skip("this GPU has no native bfloat16 (Ampere or newer has)")
    model = load_model("carl-brain-3d", CUDA)
    shape = tuple(int(n) for n in model.input_shape)
    moving, fixed = (image.to(CUDA) for image in monai_pair(shape))
    with float32_mode(tf32=False):
        exact = predict_maps(model, moving, fixed).fixed_to_moving
        fast = predict_maps(model, moving, fixed, precision="bf16").fixed_to_moving
    assert fast.dtype == torch.float32 and fast.device.type == "cuda"
    voxels = (fast - exact).abs() * (torch.tensor(shape, device=CUDA) - 1).view(1, 3, 1, 1, 1)
    assert float(voxels.max()) < 1.0
    assert 0 < float(torch.quantile(voxels.flatten()[::7], 0.99)) < 0.5


def _field(transform) -> np.ndarray:
    return sitk.GetArrayFromImage(transform.GetDisplacementField())


def test_register_on_the_gpu_equals_the_cpu_run():
    """``register()`` end to end on the MONAI pair (shipped model, labels, exact inverse) on the GPU
    and on the CPU: float32 maps that differ by ~1e-5 of the grid (~2 µm here) give fields within
    0.05 mm (the inverse stops iterating once a step changes it by < 0.01 mm), and the same metrics."""
    from carlreg.pipeline import register

    folder = gpu_data_path(*MONAI_PAIR)
    arguments = dict(
        moving=folder / "reoriented_anat_moved.nii", fixed=folder / "anatomical.nii", model="carl-brain-3d",
        modality="mr", inverse=True, moving_labels=folder / "reoriented_anat_moved_label.nii.gz",
        fixed_labels=folder / "anatomical_label.nii.gz",
    )
    with float32_mode(tf32=False):
        gpu = register(device="cuda", **arguments)
    cpu = register(device="cpu", **arguments)
    assert gpu.metrics["device"].startswith("cuda") and cpu.metrics["device"] == "cpu"
    assert np.abs(_field(gpu.transform) - _field(cpu.transform)).max() <= 0.05
    assert np.abs(_field(gpu.inverse_transform) - _field(cpu.inverse_transform)).max() <= 0.05
    warped = [sitk.GetArrayFromImage(result.warped) for result in (gpu, cpu)]
    assert np.abs(warped[0] - warped[1]).max() <= 1e-3 * (warped[1].max() - warped[1].min())
    labels = [sitk.GetArrayFromImage(result.warped_labels) for result in (gpu, cpu)]
    assert np.count_nonzero(labels[0] != labels[1]) <= 1e-3 * labels[1].size
    for key, tolerance in (("lncc_after", 1e-4), ("folding_percent", 1e-2), ("dice_after", 1e-2),
                           ("inverse_round_trip_mean_mm", 1e-2)):
        assert gpu.metrics[key] == pytest.approx(cpu.metrics[key], abs=tolerance), key


def test_refinement_on_the_gpu_equals_the_cpu_run():
    """``register()`` with the refinement (``io_mode="svf"``, the Slicer module's default) on the
    MONAI pair, with its exact inverse, on the GPU and on the CPU. Hundreds of optimiser steps
    carry the kernels' rounding along: on the CPU, 2 threads against 1 gave fields 0.056 mm apart
    at most (0.007 mm at the 99th percentile, on a 2 mm grid); the GPU may differ 5x that."""
    from carlreg.pipeline import register

    folder = gpu_data_path(*MONAI_PAIR)
    arguments = dict(
        moving=folder / "reoriented_anat_moved.nii", fixed=folder / "anatomical.nii", model="carl-brain-3d",
        modality="mr", io_mode="svf", inverse=True,
    )
    with float32_mode(tf32=False):
        gpu = register(device="cuda", **arguments)
    cpu = register(device="cpu", **arguments)
    assert gpu.metrics["device"].startswith("cuda") and gpu.metrics["refine_seconds"] > 0
    for found, expected in ((gpu.transform, cpu.transform), (gpu.inverse_transform, cpu.inverse_transform)):
        distance = np.linalg.norm(_field(found) - _field(expected), axis=-1)
        assert np.percentile(distance, 99) <= 0.05 and distance.max() <= 0.3
    for key, tolerance in (("lncc_after", 1e-3), ("folding_percent", 1e-2), ("inverse_round_trip_mean_mm", 1e-2)):
        assert gpu.metrics[key] == pytest.approx(cpu.metrics[key], abs=tolerance), key
