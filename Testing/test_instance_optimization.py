"""Instance optimization on a real 3-D pair: the loss goes down, the weights come back bit for bit."""
from __future__ import annotations

import pytest
import torch

from carlreg import build_carl
from carlreg.losses import lncc_loss
from carlreg.maps import sample
from carlreg.optimize import instance_optimize
from carlreg.progress import Cancelled
from images import MR_PAIR_3D, load_pair

SHAPE = (40, 40, 40)


@pytest.fixture(scope="module")
def small_model_and_pair():
    torch.manual_seed(0)
    model = build_carl(3, SHAPE, width=0.25).eval()
    moving, fixed = load_pair(MR_PAIR_3D, SHAPE)
    return model, moving, fixed


def _snapshot(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def _assert_bit_identical(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, value in state.items():
        assert torch.equal(value, snapshot[name]), name


def test_three_steps_lower_the_loss_and_restore_the_weights(small_model_and_pair):
    model, moving, fixed = small_model_and_pair
    before = _snapshot(model)
    reports = []
    # lr 1e-4: the loss falls by 0.10 to 0.20 over the two updates whose result is reported
    # (seeds 0, 1, 2); at lr 1e-3 it goes up and down by up to 0.3 between steps
    maps = instance_optimize(model, moving, fixed, steps=3, learning_rate=1e-4, inverse=True, progress=reports.append)
    _assert_bit_identical(model, before)
    assert [r.step for r in reports] == list(range(0, 4))  # the stage is announced before its first step
    assert reports[0].eta_s is None and reports[-1].fraction == 1.0 and reports[-1].eta_s == 0.0
    first, last = float(reports[1].message.split()[-1]), float(reports[-1].message.split()[-1])
    assert last < first - 0.05, (first, last)
    # The returned maps are the tuned network's: they register better than the untuned network.
    with torch.no_grad():
        untuned = model(moving, fixed)
    assert lncc_loss(sample(moving, maps.fixed_to_moving), fixed) < lncc_loss(sample(moving, untuned), fixed)
    assert maps.moving_to_fixed is not None and maps.moving_to_fixed.shape == (1, 3) + SHAPE
    assert all(p.grad is None for p in model.parameters())


def test_cancel_part_way_raises_and_restores_the_weights(small_model_and_pair):
    model, moving, fixed = small_model_and_pair
    before = _snapshot(model)
    steps_done = []
    with pytest.raises(Cancelled, match="instance optimization: cancelled"):
        instance_optimize(
            model, moving, fixed, steps=10, learning_rate=1e-3,
            progress=lambda report: steps_done.append(report.step),
            should_cancel=lambda: len(steps_done) >= 2,
        )
    assert steps_done == [0, 1]
    _assert_bit_identical(model, before)


def test_exception_part_way_restores_the_weights(small_model_and_pair):
    model, moving, fixed = small_model_and_pair
    before = _snapshot(model)

    def failing_progress(report):
        if report.step == 1:  # after the first step has changed the weights
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        instance_optimize(model, moving, fixed, steps=5, learning_rate=1e-3, progress=failing_progress)
    _assert_bit_identical(model, before)
    assert model.training is False


def test_bad_arguments_are_named():
    model = build_carl(2, (40, 40), width=0.125)
    image = torch.rand(1, 1, 40, 40)
    with pytest.raises(ValueError, match="tune\\(\\): steps must be"):
        instance_optimize(model, image, image, steps=-1)
    with pytest.raises(ValueError, match="make_objective\\(\\): objective must be one of"):
        instance_optimize(model, image, image, steps=1, objective="ssd")
