"""Training: the data source, and exact resume after an interruption."""
from __future__ import annotations

import json

import pytest
import torch

from carlreg.data import BRAIN_LABEL_LIMIT, PairsSource, SynthSegSource, _cut_to_window, _translate, random_contrast
from carlreg.device import describe_device
from carlreg.losses import gaussian_blur, label_overlap_loss, lncc, lncc_loss, symmetric_label_overlap, symmetric_similarity
from carlreg.maps import identity_map, sample
from carlreg.models import load_model
from carlreg.train import TrainConfig, _make_source, load_checkpoint, one_hot_labels, train
from conftest import monai_pairs_csv, shared_data_path

SHAPE = (40, 40, 40)
#: the box of Testing/test_box.py's grown-box run: the label maps resampled for it (seconds) are reused
BOX = (48, 48, 40)


def _config(folder, output):
    """Two steps, one per phase: the second is the first GradICON step; on a box grown beyond the input shape."""
    return TrainConfig(
        data_folder=str(folder), input_shape=SHAPE, box_shape=BOX, spacing_mm=5.0, max_shift=3, width=0.125,
        batch_size=1, diffusion_steps=1, steps=2, checkpoint_every=1, validate_every=0, output=str(output),
    )


def _pairs_config(tmp_path, output, **changes):
    """A short run on the user's pairs, which a run reads in a moment (a fresh process, or a new
    input shape, resamples the SynthSeg label maps for seconds)."""
    settings = dict(
        data="pairs", data_folder=str(monai_pairs_csv(tmp_path)), modality="mr", input_shape=SHAPE, width=0.125,
        batch_size=1, diffusion_steps=1, steps=2, checkpoint_every=1, validate_every=0, output=str(output),
    )
    return TrainConfig(**{**settings, **changes})


def _losses(output):
    return [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()]


def test_synthseg_pairs_are_random_contrast_images_of_two_subjects():
    folder = shared_data_path("synthseg_label_maps")
    source = SynthSegSource(folder, "validation", SHAPE, 5.0, max_shift=3)
    batch = source.batch(2, torch.Generator().manual_seed(0))
    assert batch.moving.shape == (2, 1) + SHAPE and batch.moving_labels.shape == (2, 1) + SHAPE
    assert float(batch.moving.min()) == 0.0 and float(batch.moving.max()) == 1.0
    assert not torch.equal(batch.moving_labels, batch.fixed_labels)
    again = source.batch(2, torch.Generator().manual_seed(0))
    assert torch.equal(again.moving, batch.moving)
    # brain structures (labels below 100) are inside the box
    assert int(((batch.fixed_labels > 0) & (batch.fixed_labels < 100)).sum()) > 1000
    # the two images of a pair share their contrast (LNCC can only align related contrasts):
    # the median intensity of each structure agrees between them, across structures
    for i in range(2):
        shared = [int(v) for v in torch.unique(batch.fixed_labels[i]) if int((batch.moving_labels[i] == v).sum()) > 200
                  and int((batch.fixed_labels[i] == v).sum()) > 200]
        medians = torch.tensor([[float(image[i][labels[i] == v].median()) for v in shared]
                                for image, labels in ((batch.moving, batch.moving_labels), (batch.fixed, batch.fixed_labels))])
        assert len(shared) > 10 and float(torch.corrcoef(medians)[0, 1]) > 0.8


def test_resumed_run_continues_exactly(tmp_path):
    folder = shared_data_path("synthseg_label_maps")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    reports = []
    train(_config(folder, straight), progress=reports.append)
    assert [r.step for r in reports] == [1, 2]
    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert {record["device"] for record in records} == {describe_device(torch.device("cpu"))}
    # a burst limited by steps (by wall time: the command-line test below)
    train(_config(folder, interrupted), max_steps_this_run=1)
    assert load_checkpoint(interrupted / "checkpoint.pt")["step"] == 1 and len(_losses(interrupted)) == 1
    # a line logged after the checkpoint by a run killed before its next checkpoint is dropped on resume
    with open(interrupted / "log.jsonl", "a") as log:
        log.write(json.dumps({"step": 2, "loss": -1.0}) + "\n")
    resumed = []
    train(_config(folder, interrupted), progress=resumed.append)
    assert [(r.step, r.total) for r in resumed] == [(1, 1)] and resumed[0].message.startswith("step 2/2, ")
    # exact resume: the same data, weights and optimizer state, so the same steps; compared to a
    # tolerance far below one step's change (the threaded convolutions may round differently from
    # one run to the next), not bit for bit. The resumed step's loss shows the weights and data;
    # the final weights below show the optimizer state too (Adam's moments after the first step).
    assert _losses(interrupted) == pytest.approx(_losses(straight), rel=1e-5, abs=1e-7)
    assert len(set(_losses(straight))) == 2
    assert (straight / "loss.png").stat().st_size > 1000
    # the model is told the physical spacing it was trained at (fixed-spacing input grids)
    assert load_model(straight / "checkpoint.pt", "cpu").input_spacing_mm == 5.0
    final_straight = torch.load(straight / "model.pt", weights_only=True)
    final_resumed = torch.load(interrupted / "model.pt", weights_only=True)
    for name, value in final_straight.items():
        assert torch.allclose(value, final_resumed[name], rtol=0, atol=1e-6), name
    # a new run can start from another run's weights, at another input shape and on other data
    # (lr 0: they stay as loaded)
    config = _pairs_config(tmp_path, tmp_path / "fine_tuned", input_shape=(48, 40, 44), steps=1, learning_rate=0.0,
                           init_from=str(straight / "checkpoint.pt"))
    parameters = dict(train(config).named_parameters())
    assert parameters and all(torch.equal(value, final_straight[name]) for name, value in parameters.items())
    config.init_from, config.output = "", str(tmp_path / "from_scratch")
    assert not all(torch.equal(v, final_straight[n]) for n, v in train(config).named_parameters())


def test_a_weight_average_stands_for_the_run_and_resumes_with_it(tmp_path):
    """``ema_decay``: the checkpoint keeps the weights' exponential moving average beside the
    trained weights, bias-corrected (step ``i`` of ``t`` weighted by ``decay ** (t - i)``, the
    weights normalised: not seeded with the first step's); it survives a resume, and model.pt, the
    returned network and load_model are it."""
    output = tmp_path / "averaged"
    config = _pairs_config(tmp_path, output, ema_decay=0.75)
    train(config, max_steps_this_run=1)
    first = load_checkpoint(output / "checkpoint.pt")
    assert first["averaged_steps"] == 1
    for name, value in first["model"].items():
        assert torch.equal(first["average"][name], value), name
    returned = train(config)
    second = load_checkpoint(output / "checkpoint.pt")
    assert second["step"] == 2 and second["averaged_steps"] == 2
    floats = [name for name, value in second["model"].items() if value.is_floating_point()]
    for name in floats:
        expected = (0.75 * first["model"][name] + second["model"][name]) / 1.75
        assert torch.allclose(second["average"][name], expected, rtol=0, atol=1e-6), name
    moved = [name for name in floats if not torch.equal(second["model"][name], first["model"][name])]
    assert moved and not torch.equal(second["average"][moved[0]], second["model"][moved[0]])
    saved = torch.load(output / "model.pt", weights_only=True)
    loaded = load_model(output / "checkpoint.pt", "cpu")
    for network in (saved, returned.state_dict(), loaded.state_dict()):
        assert all(torch.equal(value, second["average"][name]) for name, value in network.items())


def test_the_average_takes_the_steps_after_ema_start_and_the_trained_weights_stand_before(tmp_path):
    """``ema_start``: until then the trained weights stand for the run (model.pt; the checkpoint
    holds no average), the first step after it starts the average afresh, across a resume; without
    ``ema_decay`` it is refused."""
    output = tmp_path / "late"
    config = _pairs_config(tmp_path, output, ema_decay=0.75, ema_start=1)
    train(config, max_steps_this_run=1)
    first = load_checkpoint(output / "checkpoint.pt")
    assert "average" not in first
    saved = torch.load(output / "model.pt", weights_only=True)
    assert all(torch.equal(value, first["model"][name]) for name, value in saved.items())
    train(config)
    second = load_checkpoint(output / "checkpoint.pt")
    assert second["averaged_steps"] == 1
    assert not all(torch.equal(value, first["model"][name]) for name, value in second["model"].items())
    assert all(torch.equal(second["average"][name], value) for name, value in second["model"].items())
    with pytest.raises(ValueError, match="ema_start .* needs ema_decay"):
        train(_pairs_config(tmp_path, tmp_path / "refused", ema_start=1))


def test_relative_shifts_train_the_largest_offsets_as_often_as_the_small_ones():
    """``shifts="relative"``: a pair's relative shift is uniform up to twice ``max_shift`` per axis
    and each image stays within ``max_shift`` (``each``, independent shifts, would draw the
    largest relative shift 2 times in 49, no shift 7 times); the batch's labels carry them."""
    folder = shared_data_path("synthseg_label_maps")
    limit = 3
    source = SynthSegSource(folder, "validation", SHAPE, 5.0, max_shift=limit, shifts="relative")
    generator = torch.Generator().manual_seed(0)
    pairs = [source._relative_shifts(generator) for _ in range(400)]
    assert all(abs(v) <= limit for moving, fixed in pairs for v in moving + fixed)
    relative = torch.tensor([[m - f for m, f in zip(moving, fixed)] for moving, fixed in pairs]).flatten()
    counts = torch.bincount(relative + 2 * limit, minlength=4 * limit + 1)
    # 1200 draws on 13 values: ~92 each, every value drawn (no value more than twice another)
    assert len(counts) == 4 * limit + 1 and int(counts.max()) < 2 * int(counts.min())
    for seed in range(3):
        # the batch's draws in order: the subjects, the contrast, then the pair's shifts
        replay = torch.Generator().manual_seed(seed)
        subjects = torch.randperm(len(source.labels), generator=replay)[:2].tolist()
        random_contrast(source.max_label, replay, source.background)
        shifts = source._relative_shifts(replay)
        batch = source.batch(1, torch.Generator().manual_seed(seed))
        for labels, subject, shift in zip((batch.moving_labels, batch.fixed_labels), subjects, shifts):
            assert torch.equal(labels[0, 0], _translate(source.labels[subject], shift))
    with pytest.raises(ValueError, match="shifts must be one of"):
        SynthSegSource(folder, "validation", SHAPE, 5.0, shifts="uniform")
    config = TrainConfig(data_folder=str(folder), input_shape=SHAPE, spacing_mm=5.0, max_shift=limit, shifts="relative")
    assert _make_source(config, "train").shifts == "relative"


def test_a_field_of_view_cuts_each_moved_image_to_a_window_centred_in_the_box():
    """``field_of_view``: once moved, each image keeps only a window centred in the box, its extent
    per axis drawn from the field of view to the box's, so a head moved near a scan's edge is
    partly lost (the sweep's and real scans' case); validation images are never cut."""
    folder = shared_data_path("synthseg_label_maps")
    window = torch.zeros(SHAPE, dtype=torch.long)
    window[5:35, 10:30, 0:40] = 1
    assert torch.equal(_cut_to_window(torch.ones(SHAPE, dtype=torch.long), (30, 20, 40)), window)
    smallest, limit = 24, 6
    source = SynthSegSource(folder, "validation", SHAPE, 5.0, max_shift=limit, field_of_view=smallest)
    lost = []
    for seed in range(6):
        # the batch's draws in order: the subjects, the contrast, the moving image's shift, its window
        replay = torch.Generator().manual_seed(seed)
        subject = torch.randperm(len(source.labels), generator=replay)[0]
        random_contrast(source.max_label, replay, source.background)
        shift = torch.randint(-limit, limit + 1, (3,), generator=replay).tolist()
        extent = [int(torch.randint(smallest, n + 1, (1,), generator=replay)) for n in SHAPE]
        moved = _translate(source.labels[subject], shift)
        batch = source.batch(1, torch.Generator().manual_seed(seed))
        labels = batch.moving_labels[0, 0]
        assert torch.equal(labels, _cut_to_window(moved, extent))
        lost.append(int((moved > 0).sum()) - int((labels > 0).sum()))
        # what the image shows of its subject: the box's content once moved, within the window
        valid = _cut_to_window(_translate(torch.ones(SHAPE, dtype=torch.long), shift), extent)
        assert torch.equal(batch.moving_valid[0, 0], valid.float()) and not bool(labels[valid == 0].any())
        assert 0 < int(batch.fixed_valid.sum()) < batch.fixed_valid.numel()
    # the head fills this small box: every window cuts some of it, each by its own amount
    assert min(lost) > 0 and len(set(lost)) == len(lost)
    with pytest.raises(ValueError, match="field_of_view must be 0 to 40 voxels, got 41"):
        SynthSegSource(folder, "validation", SHAPE, 5.0, field_of_view=41)
    config = TrainConfig(data_folder=str(folder), input_shape=SHAPE, spacing_mm=5.0, field_of_view_mm=122.0)
    assert _make_source(config, "train").field_of_view == 24 and _make_source(config, "validation").field_of_view == 0


def test_the_masked_similarity_ignores_what_a_cut_lost_and_training_uses_it(tmp_path):
    """With validity masks the similarity is a mean over the voxels valid in both images: the
    moving image's content far (beyond LNCC's window) from what the cut fixed image still shows
    no longer changes it, as it changes the unmasked one; a map's points beyond the box count as
    lost. A run with ``mask_similarity`` trains on the data source's masks."""
    generator = torch.Generator().manual_seed(0)
    fixed, moving = (gaussian_blur(torch.rand((1, 1) + SHAPE, generator=generator), 2.0) for _ in range(2))
    fixed_valid = torch.ones_like(fixed)
    fixed_valid[..., 16:] = 0
    fixed = fixed * fixed_valid
    identity = identity_map(SHAPE)
    changed = moving.clone()
    # LNCC at x < 16 reads up to 2σ = 8 voxels further
    changed[..., 25:] = torch.rand(changed[..., 25:].shape, generator=generator)
    masked = [float(symmetric_similarity(m, fixed, identity, identity, 4.0, torch.ones_like(m), fixed_valid))
              for m in (moving, changed)]
    unmasked = [float(symmetric_similarity(m, fixed, identity, identity, 4.0)) for m in (moving, changed)]
    assert masked[0] == pytest.approx(masked[1], abs=1e-6) and abs(unmasked[0] - unmasked[1]) > 1e-3
    # a map that sends half the box beyond it: those points are lost, whatever the border holds
    beyond = identity.clone()
    beyond[:, 2] += 0.5
    whole = torch.ones_like(fixed)
    # x index 19 maps to unit 19/39 + 0.5 < 1, index 20 beyond
    inside = 1 - lncc(sample(moving, beyond), fixed)[..., :20].mean()
    expected = float(inside + lncc_loss(fixed, moving))
    assert float(symmetric_similarity(moving, fixed, beyond, identity, 4.0, whole, whole)) == pytest.approx(expected, abs=1e-5)
    folder = shared_data_path("synthseg_label_maps")
    plain, masked_run = _config(folder, tmp_path / "plain"), _config(folder, tmp_path / "masked")
    plain.steps = masked_run.steps = 1
    masked_run.mask_similarity = True
    train(plain)
    train(masked_run)
    assert abs(_losses(tmp_path / "masked")[0] - _losses(tmp_path / "plain")[0]) > 1e-4
    with pytest.raises(ValueError, match="mask_similarity is for synthseg3d data, .* not 'pairs' data"):
        train(_pairs_config(tmp_path, tmp_path / "pairs", mask_similarity=True))


def test_label_supervision_scores_the_warped_label_maps_and_training_uses_it(tmp_path):
    """The label overlap is 1 − the mean Dice of the warped one-hot brain label maps over the
    target's labels (exact for a whole-voxel shift, weighted by validity), its gradient moves a
    translation towards alignment, and a run with ``label_weight`` adds it to the loss."""
    folder = shared_data_path("synthseg_label_maps")
    batch = SynthSegSource(folder, "validation", BOX, 5.0).batch(1, torch.Generator().manual_seed(0))
    moving, fixed = one_hot_labels(batch, torch.device("cpu"))
    assert moving.shape[1] == fixed.shape[1] > 10 and float(moving.sum(1).max()) == 1.0
    brain = torch.where(batch.fixed_labels < BRAIN_LABEL_LIMIT, batch.fixed_labels, 0)
    assert int((fixed.sum(1, keepdim=True) > 0).sum()) == int((brain > 0).sum())
    identity = identity_map(BOX)
    assert float(symmetric_label_overlap(fixed, fixed, identity, identity)) == pytest.approx(0.0, abs=1e-6)
    # the fixed labels moved 2 voxels along x: 1 − Dice by hand, and 0 read through the map back
    moved = torch.zeros_like(fixed)
    moved[..., 2:] = fixed[..., :-2]
    inside = torch.ones_like(fixed[:, :1])
    inside[..., -2:] = 0  # where the map's points leave the box
    present = (fixed * inside).sum((2, 3, 4)) > 0
    by_hand = 2 * (fixed * moved * inside).sum((2, 3, 4)) / ((fixed + moved) * inside).sum((2, 3, 4))
    expected = 1 - float(by_hand[present].mean())
    assert expected > 0.1 and float(label_overlap_loss(moved, fixed, inside)) == pytest.approx(expected, abs=1e-5)
    shifted = identity.clone()
    shifted[:, 2] += 2 / (BOX[2] - 1)
    assert float(label_overlap_loss(sample(moved, shifted), fixed, inside)) == pytest.approx(0.0, abs=1e-5)
    # a translation t along x starting at 1 voxel: the gradient points to t = 2
    t = torch.tensor(1.0, requires_grad=True)
    step = torch.zeros_like(identity)
    step[:, 2] = 1 / (BOX[2] - 1)
    label_overlap_loss(sample(moved, identity + t * step), fixed, inside).backward()
    assert float(t.grad) < 0
    plain, supervised = _config(folder, tmp_path / "plain"), _config(folder, tmp_path / "supervised")
    plain.steps = supervised.steps = 1
    supervised.label_weight = 0.5
    train(plain)
    train(supervised)
    record = json.loads((tmp_path / "supervised" / "log.jsonl").read_text().splitlines()[0])
    assert 0.0 < record["supervision"] <= 2.0 and "supervision" not in (tmp_path / "plain" / "log.jsonl").read_text()
    assert record["loss"] == pytest.approx(record["similarity"] + 1.5 * record["regularity"] + 0.5 * record["supervision"],
                                           rel=1e-5)
    # the same batch and weights: the image terms are the plain run's, the supervision comes on top
    plain_record = json.loads((tmp_path / "plain" / "log.jsonl").read_text().splitlines()[0])
    assert record["similarity"] == pytest.approx(plain_record["similarity"], rel=1e-5)
    with pytest.raises(ValueError, match="label_weight is for synthseg3d data, .* not 'pairs' data"):
        train(_pairs_config(tmp_path, tmp_path / "pairs", label_weight=1.0))


def test_dark_background_is_black_like_the_padding_around_the_box():
    folder = shared_data_path("synthseg_label_maps")
    batch = SynthSegSource(folder, "validation", SHAPE, 5.0, background="dark").batch(2, torch.Generator().manual_seed(0))
    for image, labels in ((batch.moving, batch.moving_labels), (batch.fixed, batch.fixed_labels)):
        assert float(image.max()) == 1.0
        outside = image[labels == 0]  # near the head the blur spreads some tissue into it
        assert float(outside.quantile(0.25)) == 0.0 and float(outside.median()) < 0.01
    grey = SynthSegSource(folder, "validation", SHAPE, 5.0).batch(2, torch.Generator().manual_seed(0))
    assert float(grey.fixed[grey.fixed_labels == 0].median()) > 0.02
    with pytest.raises(ValueError, match="background must be one of"):
        SynthSegSource(folder, "validation", SHAPE, 5.0, background="grey")


def test_training_on_the_users_own_pairs(tmp_path):
    csv_path = monai_pairs_csv(tmp_path)
    config = TrainConfig(
        data="pairs", data_folder=str(csv_path), validation_csv=str(csv_path), modality="mr", input_shape=SHAPE,
        width=0.125, batch_size=2, diffusion_steps=1, steps=2, checkpoint_every=2, validate_every=2,
        validation_pairs=1, output=str(tmp_path / "run"),
    )
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["diffusion", "gradicon"]
    assert 0.0 <= records[-1]["val_dice_before"] <= 1.0 and 0.0 <= records[-1]["val_dice_after"] <= 1.0
    source = PairsSource(csv_path, SHAPE, "mr")
    moving, fixed, moving_labels, fixed_labels = source.pairs[0]
    assert moving.shape == (1, 1) + SHAPE and float(moving.max()) == 1.0
    assert int((moving_labels > 0).sum()) > 0 and int((fixed_labels > 0).sum()) > 0


def test_a_burst_from_the_command_line_stops_on_time_and_leaves_a_checkpoint(tmp_path):
    """``carl-train --max-minutes``: a GPU burst's entry point (here on the CPU, a budget of zero)."""
    import subprocess
    import sys
    from dataclasses import asdict

    settings = asdict(_pairs_config(tmp_path, tmp_path / "run"))
    (tmp_path / "config.json").write_text(json.dumps(settings))
    completed = subprocess.run(
        [sys.executable, "-m", "carlreg", "train", "--config", tmp_path / "config.json", "--device", "cpu",
         "--max-minutes", "0", "--progress", "none"], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1 and len(_losses(tmp_path / "run")) == 1
