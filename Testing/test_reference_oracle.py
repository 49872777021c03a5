"""Our engine computes what the reference (icon_registration 1.1.9) computes, for the same weights.

Each configuration builds the reference on the CPU from a seeded random state, gives its
zero-initialised output convolutions and BatchNorm statistics random values (so that every
step of the network contributes), loads that state_dict into ours with ``strict=True`` and
compares maps in both directions on a batch of one random and one real pair (in 3-D the real pair
alone: Ξ's 128-channel feature net takes seconds per 3-D image on the CPU). The maps are those
that each side's GradICON objective computes in one forward pass with the same noise, whose terms
are compared too; with the fourth step, the maps of the network without it (the first step of
the TwoStep at the top) as well: in 3-D that is where the networks without the fourth step are
compared. The 3-D shape is near the smallest that CARL takes (33 voxels per axis, where every
level still runs), with odd and even sizes, different per axis.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from carlreg import build_carl
from carlreg.losses import DiffusionObjective, GradICONObjective, lncc_loss
from carlreg.optimize import tune
from conftest import REPO
from images import MR_PAIR_2D, MR_PAIR_3D, load_pair
from reference_oracle import build_reference, float64_attention, randomise_zero_initialised

TOLERANCE = 1e-5
SHAPES = {2: (64, 80), 3: (33, 34, 36)}
REAL_PAIRS = {2: MR_PAIR_2D, 3: MR_PAIR_3D}


def make_pair_models(reference, variant, dimension, fourth_step, diffusion=False):
    torch.manual_seed(0)
    shape = SHAPES[dimension]
    ref_model = build_reference(reference, variant, dimension, shape, fourth_step, diffusion)
    randomise_zero_initialised(ref_model)
    ref_model.eval()
    ours = build_carl(dimension, shape, variant=variant, fourth_step=fourth_step)
    ours.load_state_dict(ref_model.regis_net.state_dict(), strict=True)
    ours.eval()
    return ref_model, ours


def input_batch(dimension):
    """Moving and fixed ``(2, 1, *shape)``: a random pair, then a real pair from ../shared/data."""
    shape = SHAPES[dimension]
    generator = torch.Generator().manual_seed(2)
    real_moving, real_fixed = load_pair(REAL_PAIRS[dimension], shape)
    moving = torch.cat([torch.rand((1, 1) + shape, generator=generator), real_moving])
    fixed = torch.cat([torch.rand((1, 1) + shape, generator=generator), real_fixed])
    return moving, fixed


def record_transforms(ref_model, ours, fourth_step):
    """Lists that the next forward passes fill: ours' transforms and, with the fourth step, the
    first step's transform of each side's TwoStep at the top (the network without the fourth step:
    the reference's ``netPhi`` output through a forward hook, ours' ``netPhi.transform``)."""
    mine, theirs_first, mine_first = [], [], []
    shadow_transform(ours, mine)
    if fourth_step:
        ref_model.regis_net.netPhi.register_forward_hook(lambda _module, _inputs, phi: theirs_first.append(phi))
        shadow_transform(ours.netPhi, mine_first)
    return mine, theirs_first, mine_first


def shadow_transform(module, recorded):
    """``module.transform`` appends each map it returns to ``recorded`` (shadowed on the instance)."""
    transform = module.transform

    def recording(moving, fixed):
        recorded.append(transform(moving, fixed))
        return recorded[-1]

    module.transform = recording


def objective_run(reference, variant, fourth_step, dimension):
    """Each side's GradICON objective, one forward pass with the same noise, on the input batch (in
    3-D the real pair alone): its terms, and the maps that it computed, both directions (φ_AB then
    φ_BA) and, with the fourth step, the first step's, as (reference's, ours) on the grid."""
    ref_model, ours = make_pair_models(reference, variant, dimension, fourth_step)
    moving, fixed = input_batch(dimension)
    if dimension == 3:
        moving, fixed = moving[1:], fixed[1:]
    mine, theirs_first, mine_first = record_transforms(ref_model, ours, fourth_step)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = ref_model(moving, fixed)
    torch.manual_seed(5)
    with torch.no_grad():
        got = GradICONObjective(ours)(moving, fixed)
        maps = torch.cat([ref_model.phi_AB_vectorfield, ref_model.phi_BA_vectorfield]), on_grid(mine, ours)
        first_maps = None
        if fourth_step:
            theirs = torch.cat([phi(ref_model.regis_net.identity_map) for phi in theirs_first])
            first_maps = theirs, on_grid(mine_first, ours)
    return types.SimpleNamespace(expected=expected, got=got, maps=maps, first_maps=first_maps,
                                 identity=ref_model.identity_map, batch=2 * len(moving))


def on_grid(recorded, ours):
    """Ours' recorded maps on its grid, in the order they were computed."""
    return torch.cat([phi.on_grid(ours.identity_map) for phi in recorded])


@pytest.fixture(scope="module")
def runs(reference):
    """``run(variant, fourth_step, dimension)``: :func:`objective_run`, computed once per module."""
    done = {}

    def run(*configuration):
        if configuration not in done:
            done[configuration] = objective_run(reference, *configuration)
        return done[configuration]

    return run


def assert_equal_maps(expected, got, identity, batch, dimension):
    """Ours within TOLERANCE of the reference's maps, each of which is far from the identity."""
    displacement = (expected - identity).flatten(1).abs().max(1).values
    assert displacement.min() > 0.05, "the comparison must involve non-trivial maps, each pair's"
    assert got.shape == expected.shape == (batch, dimension) + SHAPES[dimension]
    assert (got - expected).abs().max() <= TOLERANCE


#: (variant, fourth_step, dimension); in 3-D the networks without the fourth step are compared
#: inside those with it (``objective_run``'s first-step maps)
CONFIGURATIONS = [
    (variant, fourth_step, 2) for variant in ("final_final", "final") for fourth_step in (False, True)
] + [(variant, True, 3) for variant in ("final_final", "final")]


@pytest.mark.parametrize("variant, fourth_step, dimension", CONFIGURATIONS)
def test_maps_equal_reference(runs, variant, fourth_step, dimension):
    run = runs(variant, fourth_step, dimension)
    assert_equal_maps(*run.maps, run.identity, run.batch, dimension)
    if fourth_step:
        assert_equal_maps(*run.first_maps, run.identity, run.batch, dimension)


def test_state_dict_matches_published_key_listing():
    """Key paths and shapes equal the listing printed from the reference (../shared/design)."""
    listing = REPO.parent / "shared" / "design" / "reference-keys-final_final+psi3.txt"
    if not listing.exists():
        message = f"{listing} not found (../shared/design beside the repository)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    expected = {}
    for line in listing.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        expected[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    ours = build_carl(3, (40, 48, 56), variant="final_final", fourth_step=True)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == 56_997_503


@pytest.mark.parametrize("variant, fourth_step, dimension", [("final_final", False, 2), ("final_final", True, 3)])
def test_gradicon_objective_equals_reference(runs, variant, fourth_step, dimension):
    """The terms of the runs whose maps test_maps_equal_reference compares."""
    run = runs(variant, fourth_step, dimension)
    expected, ours_terms = run.expected, run.got
    assert abs(float(ours_terms.similarity) - float(expected.similarity_loss)) <= TOLERANCE
    assert abs(float(ours_terms.regularity) - float(expected.inverse_consistency_loss)) <= TOLERANCE * max(
        1.0, float(expected.inverse_consistency_loss)
    )
    assert abs(float(ours_terms.total) - float(expected.all_loss)) <= TOLERANCE * max(1.0, float(expected.all_loss))
    assert float(expected.inverse_consistency_loss) > 0


def test_gradicon_sparse_equals_reference(reference):
    import icon_registration as icon

    ref_model, ours = make_pair_models(reference, "final_final", 2, fourth_step=False)
    sparse = icon.losses.GradientICONSparse(ref_model.regis_net, icon.LNCC(4), 1.5)
    sparse.assign_identity_map([1, 1, *SHAPES[2]])
    moving, fixed = input_batch(2)
    torch.manual_seed(6)
    with torch.no_grad():
        expected = sparse(moving, fixed)
    torch.manual_seed(6)
    with torch.no_grad():
        ours_terms = GradICONObjective(ours, sparse=True)(moving, fixed)
    assert abs(float(ours_terms.regularity) - float(expected.inverse_consistency_loss)) <= TOLERANCE
    assert abs(float(ours_terms.total) - float(expected.all_loss)) <= TOLERANCE


@pytest.mark.parametrize("dimension", [2, 3])
def test_diffusion_objective_equals_reference(reference, dimension):
    ref_model, ours = make_pair_models(reference, "final_final", dimension, fourth_step=False, diffusion=True)
    moving, fixed = input_batch(dimension)
    moving, fixed = moving[1:], fixed[1:]
    with torch.no_grad():
        expected = ref_model(moving, fixed)
    with torch.no_grad():
        ours_terms = DiffusionObjective(ours)(moving, fixed)
    assert float(expected.bending_energy_loss) > 0
    assert abs(float(ours_terms.regularity) - float(expected.bending_energy_loss)) <= TOLERANCE
    assert abs(float(ours_terms.similarity) - float(expected.similarity_loss)) <= TOLERANCE
    assert abs(float(ours_terms.total) - float(expected.all_loss)) <= TOLERANCE


@pytest.mark.parametrize("dimension", [2, 3])
def test_lncc_equals_reference(reference, dimension):
    import icon_registration as icon

    moving, fixed = input_batch(dimension)
    expected = icon.LNCC(4)(moving, fixed)
    assert abs(float(lncc_loss(moving, fixed, 4)) - float(expected)) <= 1e-6
    assert float(lncc_loss(fixed, fixed, 4)) < 0.5 * float(expected)


def test_weights_after_one_instance_optimization_step_equal_reference(reference):
    """One step of the reference's instance optimization (Adam, lr 2e-5, GradICON) on a real pair.

    Adam's first step moves each weight by ``lr · g / (|g| + eps)``, i.e. by ±lr whatever the
    size of ``g``: where a gradient is float32 noise (GradICON's finite differences divide
    rounding by δ = 1e-3) its sign, and so the step, may differ. The gradients are compared
    relative to their size; the weights to 1e-5 wherever the gradient is above that noise.
    """
    ref_model, ours = make_pair_models(reference, "final_final", 2, fourth_step=False)
    moving, fixed = input_batch(2)
    moving, fixed = moving[1:], fixed[1:]
    initial = {name: value.clone() for name, value in ours.state_dict().items()}
    learning_rate = 2e-5
    optimizer = torch.optim.Adam(ref_model.parameters(), lr=learning_rate)
    torch.manual_seed(7)
    with float64_attention():
        ref_model(moving, fixed).all_loss.backward()
    ref_gradients = {name: p.grad.clone() for name, p in ref_model.regis_net.named_parameters()}
    optimizer.step()
    torch.manual_seed(7)
    tune(ours, moving, fixed, steps=1, learning_rate=learning_rate)
    expected = ref_model.regis_net.state_dict()
    parameters = dict(ours.named_parameters())
    beyond_tolerance = 0
    for name, value in ours.state_dict().items():
        difference = (value - expected[name]).abs()
        if name not in parameters:  # BatchNorm statistics: eval mode leaves them as they were
            assert torch.equal(value, initial[name]), name
            continue
        gradient = ref_gradients[name].abs()
        above_noise = gradient > 1e-3 * gradient.max()
        assert difference[above_noise].max() <= TOLERANCE, name
        assert difference.max() <= 2 * learning_rate + TOLERANCE, name
        beyond_tolerance += int((difference > TOLERANCE).sum())
    assert beyond_tolerance < 1e-4 * sum(p.numel() for p in parameters.values())
    moved = sum(int((value != initial[name]).sum()) for name, value in ours.state_dict().items())
    assert moved > 1_000_000, "one Adam step must change the weights"
