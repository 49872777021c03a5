"""The paper's retina protocol (drive2d): pair composition, variants, training and evaluation."""
from __future__ import annotations

import pytest
import torch

from carlreg import retina
from carlreg.maps import identity_map
from carlreg.metrics import folding_percent, mean_dice
from carlreg.models import load_model
from carlreg.retina import DriveSource, make_pair
from carlreg.train import TrainConfig, train
from conftest import shared_data_path


@pytest.fixture(scope="module")
def test_images():
    return DriveSource(shared_data_path("drive"), "test", "baseline")


def test_splits_and_images(test_images):
    folder = shared_data_path("drive")
    assert test_images.numbers == (21, 22, 23)
    assert len(DriveSource(folder, "train").numbers) == 17
    segmentation = test_images.segmentations[0]
    assert segmentation.shape == (2, 584, 565)
    image, vessels = segmentation
    # the image is 1 inside the field of view away from vessels, 0 on vessels and outside
    assert set(torch.unique(image).tolist()) == {0.0, 1.0} and set(torch.unique(vessels).tolist()) == {0.0, 1.0}
    assert float((image * vessels).sum()) == 0.0
    assert 0.3 < float(image.mean()) < 0.8 and 0.05 < float(vessels.mean()) < 0.2


def test_pairs_are_pooled_canvases_with_consistent_labels(test_images):
    pairs = test_images.fixed_set(2)
    assert pairs.moving.shape == (12, 1, 196, 141) == pairs.fixed_labels.shape
    for image, labels in ((pairs.moving, pairs.moving_labels), (pairs.fixed, pairs.fixed_labels)):
        # a vessel pixel covers at least a quarter vessel, so its image value is at most 3/4
        assert float(image[labels == 1].max()) <= 0.75 + 2e-4
        assert int(labels.sum()) > 1000
    # the 200 padded rows (50 after pooling) are empty in the moving image
    assert float(pairs.moving[:, :, 146:].abs().max()) == 0.0
    # the fixed image is a different, smooth deformation of the moving one
    assert 0.2 < mean_dice(pairs.moving_labels, pairs.fixed_labels) < 0.6
    again = test_images.fixed_set(2)
    assert torch.equal(again.fixed, pairs.fixed)


@pytest.mark.parametrize("variant, shift_rows, rows", [("baseline", None, 0), ("shift", None, 50), ("baseline", 80, 20)])
def test_without_warps_the_variants_are_exact_shifts(monkeypatch, test_images, variant, shift_rows, rows):
    monkeypatch.setattr(retina, "ELASTIC_WARPS", ((3, 0.0), (6, 0.0)))
    segmentation = test_images.segmentations[1]
    generator = torch.Generator().manual_seed(0)
    moving, fixed, moving_labels, fixed_labels = make_pair(segmentation, variant, True, generator, shift_rows)
    assert torch.allclose(fixed[:, rows:], moving[:, : 196 - rows], atol=1e-5)
    assert torch.equal(fixed_labels[:, rows:], moving_labels[:, : 196 - rows])


def test_scale_shift_shrinks_the_retina(monkeypatch, test_images):
    monkeypatch.setattr(retina, "ELASTIC_WARPS", ((3, 0.0), (6, 0.0)))
    moving, fixed, _, _ = make_pair(test_images.segmentations[0], "scale_shift", False, torch.Generator())
    area_ratio = float((fixed > 0.5).sum()) / float((moving > 0.5).sum())
    assert abs(area_ratio - 0.8**2) < 0.03
    rows_with_retina = torch.nonzero((fixed[0] > 0.5).any(dim=1)).flatten()
    assert int(rows_with_retina.min()) > 50


def test_bad_variant_and_shift_are_refused(test_images):
    with pytest.raises(ValueError, match="variant must be one of"):
        make_pair(test_images.segmentations[0], "rotate", False, torch.Generator())
    with pytest.raises(ValueError, match="shift_rows must be within \\[0, 200\\], got 240"):
        make_pair(test_images.segmentations[0], "baseline", False, torch.Generator(), 240)


def test_training_a_2d_model_on_drive2d(tmp_path):
    config = TrainConfig(
        data="drive2d", data_folder=str(shared_data_path("drive")), input_shape=(196, 141), width=0.125,
        batch_size=1, diffusion_steps=1, steps=2, checkpoint_every=1, validate_every=2, validation_pairs=2,
        output=str(tmp_path / "run"),
    )
    train(config)
    model = load_model(tmp_path / "run" / "checkpoint.pt", "cpu")
    assert model.config.dimension == 2 and tuple(model.input_shape) == (196, 141)
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"val_dice_after"' in log
    with pytest.raises(ValueError, match="drive2d images are"):
        train(TrainConfig(data="drive2d", data_folder=config.data_folder, input_shape=(64, 64), output=str(tmp_path / "x")))


def test_folding_percent_of_maps():
    assert folding_percent(identity_map((20, 30))) == 0.0
    mirrored = identity_map((10, 12, 14))
    mirrored[:, 2] = 1 - mirrored[:, 2]
    assert folding_percent(mirrored) == 100.0
    # a fold over the middle third of one axis
    folded = identity_map((40, 30))
    folded[:, 0, 14:26] = folded[:, 0, 14:26].flip(1)
    assert 20.0 < folding_percent(folded) < 40.0
