"""The shipped models: their cards' figures are what the benchmark computes from the shipped weights."""
from __future__ import annotations

import csv
import json

import pytest

from carlreg.models import load_model
from carlreg.registry import WEIGHTS_DIR, available_models, model_card, sha256_of
from conftest import REPO, load_bench, shared_data_path

#: the per-pair figures of bench/results/retina.csv
FIGURES = ("dice", "folding_percent", "folding_in_retina_percent")

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
    """The cards' figures summarise bench/results/retina.csv's rows; the shipped weights recompute
    those rows (every test image and flip, the first of its warps: a warp's draw does not depend
    on how many are drawn, so pair ``k`` here is pair ``k · warps_per_image`` there)."""
    retina = load_bench("retina")
    recorded = json.loads((REPO / "bench" / "results" / "retina.json").read_text())
    with open(REPO / "bench" / "results" / "retina.csv", newline="") as handle:
        rows = [{**row, "pair": int(row["pair"]), **{key: float(row[key]) for key in FIGURES}} for row in csv.DictReader(handle)]
    summary = retina.summarise(rows)
    assert summary == recorded["summary"]
    for method, name in (("CARL", "carl-retina-2d"), ("displacement-only", "unet-retina-2d")):
        metrics = model_card(name)["metrics"]
        assert metrics["test_pairs"] == summary[method]
        assert metrics["no_registration"] == summary["none"]
    models = {"CARL": load_model("carl-retina-2d", "cpu"), "displacement-only": load_model("unet-retina-2d", "cpu")}
    recomputed = retina.evaluate(models, 1, shared_data_path("drive"))
    by_key = {(r["variant"], r["pair"], r["method"]): r for r in rows}
    assert len(recomputed) * recorded["warps_per_image"] == len(rows)
    for row in recomputed:
        expected = by_key[row["variant"], row["pair"] * recorded["warps_per_image"], row["method"]]
        # thread counts may flip a few nearest-neighbour pixels, nothing more
        assert row["dice"] == pytest.approx(expected["dice"], abs=2e-3), expected
        assert row["folding_percent"] == pytest.approx(expected["folding_percent"], abs=0.05), expected


def test_brain_cards_are_what_the_benchmark_computes_and_carl_meets_its_target(tmp_path):
    """The cards' figures summarise bench/results/brain.json's rows (subjects 19-20, never trained
    or validated on); the shipped weights recompute the rows of its first pair (19 → 20). The target
    of carl-brain-3d: at least 10 Dice points over no registration, < 1 % folding."""
    shared_data_path("synthseg_label_maps")
    brain = load_bench("brain")
    recorded = json.loads((REPO / "bench" / "results" / "brain.json").read_text())
    assert brain.summarise(recorded["rows"], list(recorded["summary"])) == recorded["summary"]
    moving, fixed = brain.make_pairs(tmp_path)[0]
    figures = {}
    for method, name in (("none", "carl-brain-3d"), ("ours", "carl-brain-3d"), ("displacement_only", "unet-brain-3d")):
        figures[method] = brain.run_one(method, moving, fixed, name, 0, tmp_path)
        (expected,) = [r for r in recorded["rows"] if (r["method"], r["moving"], r["fixed"]) == (method, moving["subject"], fixed["subject"])]
        # thread counts may flip a few nearest-neighbour voxels, nothing more
        assert figures[method]["dice"] == pytest.approx(expected["dice"], abs=2e-3), method
        assert figures[method]["folding_percent"] == pytest.approx(expected["folding_percent"], abs=0.05), method
    for method, name in (("ours", "carl-brain-3d"), ("displacement_only", "unet-brain-3d")):
        card = model_card(name)["metrics"]
        assert recorded["weights_sha256"][method] == model_card(name)["sha256"]
        assert card["test_pairs"] == recorded["summary"][method]
        assert card["no_registration"] == recorded["summary"]["none"]
    summary = {method: recorded["summary"][method][brain.TEST_SET] for method in ("none", "ours")}
    assert summary["ours"]["dice"] >= summary["none"]["dice"] + 0.10
    assert summary["ours"]["folding_percent"] < 1.0
