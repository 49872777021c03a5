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
