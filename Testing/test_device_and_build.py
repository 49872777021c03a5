"""Device choice, precision, builder validation, and the Python 3.9 syntax the engine must keep."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carlreg import build_carl
from carlreg.device import bf16_supported, resolve_device, resolve_precision
from carlreg.inference import predict_maps
from conftest import REPO, require_module

ENGINE = REPO / "CARLRegistration" / "carlreg"


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_explicit_choice_wins_and_unavailable_devices_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA was asked for, but no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda\\[:N\\] or mps, got 'tpu'"):
        resolve_device("tpu")


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)
    if not bf16_supported(cpu):
        with pytest.raises(ValueError, match="no native bfloat16 support"):
            resolve_precision("bf16", cpu)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bfloat16")
def test_bf16_mode_stays_close_to_fp32():
    torch.manual_seed(0)
    model = build_carl(3, (40, 40, 40), width=0.25).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv3d) and module.weight.abs().max() == 0:
                module.weight.normal_(std=0.02)
    moving, fixed = torch.rand(1, 1, 40, 40, 40), torch.rand(1, 1, 40, 40, 40)
    exact = predict_maps(model, moving, fixed).fixed_to_moving
    fast = predict_maps(model, moving, fixed, precision="bf16").fixed_to_moving
    assert fast.dtype == torch.float32
    difference_voxels = (fast - exact).abs() * 39
    assert float(difference_voxels.max()) < 1.0
    assert 0 < float(torch.quantile(difference_voxels.flatten(), 0.99)) < 0.5


def test_predict_computes_only_the_directions_asked_for():
    model = build_carl(2, (40, 48), width=0.125)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(1))
    image = torch.rand(1, 1, 40, 48)
    assert predict_maps(model, image, image).moving_to_fixed is None
    assert len(calls) == 1
    pair = predict_maps(model, image, image, inverse=True)
    assert len(calls) == 3 and pair.moving_to_fixed.shape == (1, 2, 40, 48)
    assert model.training is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dimension=4, input_shape=(40, 40)), "dimension must be 2 or 3, got 4"),
        (dict(dimension=3, input_shape=(40, 40)), "input_shape must be 3 sizes of at least 33 voxels"),
        (dict(dimension=2, input_shape=(40, 20)), "at least 33 voxels, got \\[40, 20\\]"),
        (dict(dimension=2, input_shape=(40, 40), variant="smolatt"), "variant must be one of"),
        (dict(dimension=2, input_shape=(40, 40), width=0), "width must be positive"),
    ],
)
def test_build_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_carl(**kwargs)


def test_wrong_input_shape_is_named():
    model = build_carl(2, (40, 48), width=0.125)
    with pytest.raises(ValueError, match="moving image must be \\(B, C, \\*\\[40, 48\\]\\), got \\(1, 1, 48, 40\\)"):
        model(torch.rand(1, 1, 48, 40), torch.rand(1, 1, 40, 48))


def test_width_scales_channels_and_keeps_key_paths():
    full = build_carl(3, (40, 40, 40))
    slim = build_carl(3, (40, 40, 40), width=0.25)
    assert full.state_dict().keys() == slim.state_dict().keys()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(full) == 39_327_274
    assert count(slim) < count(full) / 10


@pytest.mark.parametrize("path", sorted(ENGINE.rglob("*.py")), ids=lambda p: p.name)
def test_engine_parses_as_python_3_9(path: Path):
    source = path.read_text()
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    uses_new_union = any(
        isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
    )
    if uses_new_union:
        assert "from __future__ import annotations" in source


def test_module_and_engine_need_nothing_newer_than_python_3_9():
    """Slicer 5.8 runs Python 3.9, where slicer-core has no wheel: vermin reads the module and the
    engine for language features and standard-library names newer than 3.9 (`X | Y` annotations
    are checked above)."""
    require_module("vermin")
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("vermin")), "--target=3.9-", "--violations", "--no-tips", "--eval-annotations",
         str(REPO / "CARLRegistration" / "CARLRegistration.py"), str(ENGINE)],
        capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_engine_never_imports_slicer_or_prints():
    for path in ENGINE.rglob("*.py"):
        source = path.read_text()
        assert "import slicer" not in source and ".cuda()" not in source, path
        if path.name not in ("cli.py", "train_cli.py", "demo.py"):  # the commands print, the engine reports
            assert "print(" not in source, path


def test_displacement_only_baseline_replaces_the_attention_by_a_unet():
    baseline = build_carl(2, (72, 80), width=0.125, first_step="unet")
    carl = build_carl(2, (72, 80), width=0.125)
    assert not any("convs" in key for key in baseline.state_dict())
    assert {k for k in baseline.state_dict() if "netPsi" in k} == {k for k in carl.state_dict() if "netPsi" in k}
    image = torch.rand(1, 1, 72, 80)
    with torch.no_grad():
        assert baseline.eval()(image, image).shape == (1, 2, 72, 80)
    with pytest.raises(ValueError, match="needs inputs of at least 65 voxels"):
        build_carl(2, (40, 40), first_step="unet")
