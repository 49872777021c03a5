"""Loading models: training checkpoints, state_dicts with model cards, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from carlreg import build_carl
from carlreg.models import load_model, sha256_of

ARCHITECTURE = {"dimension": 3, "input_shape": [40, 40, 40], "width": 0.125}


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_carl(3, (40, 40, 40), width=0.125)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _card(path, **extra):
    path.with_suffix(".json").write_text(json.dumps({"architecture": ARCHITECTURE, **extra}))


def test_state_dict_with_its_card_loads_and_computes_the_same(saved):
    model, path = saved
    _card(path, sha256=sha256_of(path))
    loaded = load_model(path, device="cpu")
    image = torch.rand(1, 1, 40, 40, 40)
    with torch.no_grad():
        # two forward passes: equal up to the threaded kernels' rounding, not bit for bit
        assert torch.allclose(loaded(image, image), model.eval()(image, image), atol=1e-5)
    assert not loaded.training and loaded.input_shape == (40, 40, 40)


def test_training_checkpoint_carries_its_architecture(saved, tmp_path):
    model, _ = saved
    config = {"input_shape": [40, 40, 40], "variant": "final_final", "fourth_step": False, "width": 0.125}
    torch.save({"model": model.state_dict(), "optimizer": {}, "step": 3, "config": config}, tmp_path / "checkpoint.pt")
    assert load_model(tmp_path / "checkpoint.pt", device="cpu").config.width == 0.125


def test_bare_state_dict_needs_a_card(saved):
    _, path = saved
    with pytest.raises(ValueError, match="is a bare state_dict; put its model card tiny.json beside it"):
        load_model(path, device="cpu")


def test_mismatched_architecture_is_named(saved):
    _, path = saved
    path.with_suffix(".json").write_text(json.dumps({"architecture": dict(ARCHITECTURE, width=0.25)}))
    with pytest.raises(ValueError, match="does not fit a CARL network .* shape of netPhi"):
        load_model(path, device="cpu")
    path.with_suffix(".json").write_text(json.dumps({"architecture": dict(ARCHITECTURE)}))
    state = torch.load(path, weights_only=True)
    state.pop("netPsi.net.lastConv.bias")
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing keys \\['netPsi.net.lastConv.bias'\\]"):
        load_model(path, device="cpu")


def test_checksum_mismatch_is_refused(saved):
    _, path = saved
    _card(path, sha256="0" * 64)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_model(path, device="cpu")


def test_unknown_names_and_modules_without_shape():
    with pytest.raises(ValueError, match="no model named 'no-such-model'"):
        load_model("no-such-model", device="cpu")
    with pytest.raises(ValueError, match="must carry its input_shape"):
        load_model(torch.nn.Linear(2, 2), device="cpu")


def test_a_shipped_model_downloads_into_the_cache_with_its_checksum(saved, tmp_path, monkeypatch):
    from carlreg import registry

    model, path = saved
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    shipped.mkdir()
    card = {"architecture": ARCHITECTURE, "file": "remote.pt", "url": path.as_uri(), "sha256": sha256_of(path)}
    (shipped / "remote.json").write_text(json.dumps(card))
    monkeypatch.setattr(registry, "WEIGHTS_DIR", shipped)
    monkeypatch.setattr(registry, "CACHE_DIR", cache)
    assert registry.available_models() == ["remote"] == registry.available_models(dimension=3)
    assert registry.available_models(dimension=2) == []
    loaded = load_model("remote", device="cpu")
    assert (cache / "remote.pt").is_file() and not (shipped / "remote.pt").exists()
    image = torch.rand(1, 1, 40, 40, 40)
    with torch.no_grad():
        # two forward passes: equal up to the threaded kernels' rounding, not bit for bit
        assert torch.allclose(loaded(image, image), model.eval()(image, image), atol=1e-5)
    (cache / "remote.pt").unlink()
    (shipped / "remote.json").write_text(json.dumps(dict(card, sha256="0" * 64)))
    with pytest.raises(ValueError, match="does not match its SHA256; nothing was kept"):
        load_model("remote", device="cpu")
    assert list(cache.iterdir()) == []
