"""The shipped models: their cards' figures are what the benchmark computes from the shipped weights."""
from __future__ import annotations

import json

import pytest

from carlreg.models import load_model
from carlreg.registry import WEIGHTS_DIR, available_models, model_card, sha256_of
from conftest import REPO, load_bench, shared_data_path

#: the models whose weights ship with the package (others, like uniCARL, are downloaded on first use)
SHIPPED = [name for name in available_models() if (WEIGHTS_DIR / model_card(name)["file"]).is_file()]


def test_every_card_is_complete_and_its_weights_match():
    assert {"carl-retina-2d", "unet-retina-2d", "carl-brain-3d", "unet-brain-3d"} <= set(SHIPPED)
    for name in SHIPPED:
        card = model_card(name)
        for key in ("architecture", "modality", "preprocessing", "training", "metrics", "sha256", "license"):
            assert key in card, f"{name}: card lacks {key}"
        assert card["training"]["wall_clock_hours"] > 0 and card["training"]["steps"] > 0
        assert sha256_of(WEIGHTS_DIR / card["file"]) == card["sha256"]
        assert (WEIGHTS_DIR / f"{name}.md").read_text().count(card["sha256"]) == 1
        assert "test_pairs" in card["metrics"], f"{name}: card has no metrics ({card['metrics']['source']})"
    # the Slicer module offers the 3-D models that are not comparison baselines
    assert "carl-brain-3d" in available_models(3, baselines=False)
    assert "unet-brain-3d" in available_models(3) and "unet-brain-3d" not in available_models(3, baselines=False)
    assert not {"carl-retina-2d", "unet-retina-2d"} & set(available_models(3))


def test_retina_cards_are_what_the_benchmark_computes_from_the_shipped_weights():
    retina = load_bench("retina")
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


def test_brain_cards_are_what_the_benchmark_computes_and_carl_meets_its_target(tmp_path):
    """bench/brain.py's pairs (subjects 19-20, never trained or validated on) rerun with the shipped
    weights; the target of carl-brain-3d: at least 10 Dice points over no registration, < 1 % folding."""
    shared_data_path("synthseg_label_maps")
    brain = load_bench("brain")
    recorded = json.loads((REPO / "bench" / "results" / "brain.json").read_text())
    pairs = brain.make_pairs(tmp_path)
    figures = {}
    for method, name in (("none", "carl-brain-3d"), ("ours", "carl-brain-3d"), ("displacement_only", "unet-brain-3d")):
        rows = [brain.run_one(method, moving, fixed, name, 0, tmp_path) for moving, fixed in pairs]
        figures[method] = {key: sum(r[key] for r in rows) / len(rows) for key in ("dice", "folding_percent")}
        expected = recorded["summary"][method][brain.TEST_SET]
        assert figures[method]["dice"] == pytest.approx(expected["dice"], abs=2e-3), method
        assert figures[method]["folding_percent"] == pytest.approx(expected["folding_percent"], abs=0.05), method
    for method, name in (("ours", "carl-brain-3d"), ("displacement_only", "unet-brain-3d")):
        card = model_card(name)["metrics"]
        assert recorded["weights_sha256"][method] == model_card(name)["sha256"]
        assert card["test_pairs"] == recorded["summary"][method]
        assert card["no_registration"] == recorded["summary"]["none"]
    assert figures["ours"]["dice"] >= figures["none"]["dice"] + 0.10
    assert figures["ours"]["folding_percent"] < 1.0
