"""weights/ship.py: the shipped cards are what it computes from the committed bench results."""
from __future__ import annotations

import importlib.util
import json

import pytest

from carlreg.registry import WEIGHTS_DIR
from conftest import REPO


def _ship():
    spec = importlib.util.spec_from_file_location("ship", REPO / "weights" / "ship.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["carl-brain-3d", "unet-brain-3d", "carl-retina-2d", "unet-retina-2d"])
def test_a_refresh_of_a_shipped_card_changes_nothing(name):
    """`ship.py NAME --refresh` recomputes the card's metrics from the bench JSON and its input text
    from the committed training config: on the committed tree it reproduces the shipped card, so a
    bench result or an engine change that moved the figures without a refresh fails here."""
    ship = _ship()
    card = ship.refreshed_card(name, REPO / ship.MODELS[name]["metrics_file"])
    shipped = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    assert card == shipped
    assert "test_pairs" in card["metrics"]
    assert (WEIGHTS_DIR / f"{name}.md").read_text() == ship.markdown(card)


def test_the_card_says_where_each_part_of_a_run_trained():
    """A run that went on elsewhere (a GPU burst, then the CPU): steps and hours per device, in
    order of first use, from the log's records (older records, without a device, were a CPU's)."""
    records = ([{"seconds": 0.2, "device": "GPU NVIDIA H200"}] * 3 + [{"seconds": 1800.0, "device": "CPU AMD EPYC, 2 threads"}] * 2
               + [{"seconds": 720.0}])
    assert _ship()._hardware(records) == ("3 steps, 0.00 h on GPU NVIDIA H200; 2 steps, 1.00 h on CPU AMD EPYC, 2 threads; "
                                          "1 step, 0.20 h on CPU (not logged)")


def test_the_card_says_which_pairs_trained_it_and_which_weights_it_holds():
    """The capture-range recipe's translations, cuts and masked similarity, and the average that
    stands for a run with ``ema_decay``, read from the run's config; a run without it ships its
    last step's weights, and a 2-D source's card says nothing of translations."""
    ship = _ship()
    config = {"data": "synthseg3d", "max_shift": 20, "spacing_mm": 3.0, "shifts": "each", "field_of_view_mm": 192.0,
              "mask_similarity": True, "ema_decay": 0.998, "ema_start": 300}
    assert ship._augmentation(config) == ("each image moved by up to ±60 mm per axis (shifts `each`), cut to a field of "
                                          "view of 192 mm or more, centred in the box, the similarity taken where both "
                                          "images are valid")
    assert ship._weights_of(config, 957).startswith("the average of the trained weights of steps 301–957")
    assert ship._weights_of({"data": "drive2d"}, 500) == "the weights of step 500"
    assert ship._augmentation({"data": "drive2d"}) is None
