"""The shipped models: their cards' figures are what the benchmark computes from the shipped weights."""
from __future__ import annotations

import importlib.util
import json

import pytest

from carlreg.models import load_model
from carlreg.registry import WEIGHTS_DIR, available_models, model_card, sha256_of
from conftest import REPO, shared_data_path

SHIPPED = available_models()


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_card_is_complete_and_its_weights_match():
    assert {"carl-retina-2d", "unet-retina-2d"} <= set(SHIPPED)
    for name in SHIPPED:
        card = model_card(name)
        for key in ("architecture", "modality", "preprocessing", "training", "metrics", "sha256", "license"):
            assert key in card, f"{name}: card lacks {key}"
        assert card["training"]["wall_clock_hours"] > 0 and card["training"]["steps"] > 0
        assert sha256_of(WEIGHTS_DIR / card["file"]) == card["sha256"]
        assert (WEIGHTS_DIR / f"{name}.md").read_text().count(card["sha256"]) == 1
        assert "test_pairs" in card["metrics"], f"{name}: card has no metrics ({card['metrics']['source']})"


def test_retina_cards_are_what_the_benchmark_computes_from_the_shipped_weights():
    retina = _bench("retina")
    cards = {name: model_card(name) for name in ("carl-retina-2d", "unet-retina-2d")}
    recorded = json.loads((REPO / "bench" / "results" / "retina.json").read_text())
    models = {"CARL": load_model("carl-retina-2d", "cpu"), "displacement-only": load_model("unet-retina-2d", "cpu")}
    summary = retina.summarise(retina.evaluate(models, recorded["warps_per_image"], shared_data_path("drive")))
    for method, name in (("CARL", "carl-retina-2d"), ("displacement-only", "unet-retina-2d")):
        for variant, figures in cards[name]["metrics"]["test_pairs"].items():
            assert summary[method][variant]["pairs"] == figures["pairs"]
            # thread counts may flip a few nearest-neighbour pixels, nothing more
            assert summary[method][variant]["dice"] == pytest.approx(figures["dice"], abs=2e-3)
            assert summary[method][variant]["folding_percent"] == pytest.approx(figures["folding_percent"], abs=0.05)
