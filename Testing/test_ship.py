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
