"""How far float32 maps are from a float64 evaluation: the reference's and ours.

Same seeded random CARL weights and inputs as the oracle tests (output convolutions and
BatchNorm statistics randomised; a random pair and a real MR pair from ../shared/data at
36×40×48), one direction. The float64 truth is our network run in float64 (the oracle tests
show it equals the reference's float64 evaluation).

Usage: python bench/precision.py
"""
from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "CARLRegistration"), str(REPO / "Testing")]

from carlreg import build_carl  # noqa: E402
from reference_oracle import build_reference, load_reference, randomise_zero_initialised  # noqa: E402
from test_reference_oracle import SHAPES, input_batch  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    shape = SHAPES[3]
    reference = load_reference()
    torch.manual_seed(0)
    ref_model = build_reference(reference, "final_final", 3, shape, fourth_step=False)
    randomise_zero_initialised(ref_model)
    ref_model.eval()
    moving, fixed = input_batch(3)
    with torch.no_grad():
        ref_model(moving, fixed)
        reference_fp32 = ref_model.phi_AB_vectorfield.double()
        ours = build_carl(3, shape)
        ours.load_state_dict(ref_model.regis_net.state_dict())
        ours_fp32 = ours.eval()(moving, fixed).double()
        truth = ours.double()(moving.double(), fixed.double())
    scale = max(shape) - 1
    print(f"# bench/precision.py, {datetime.date.today()}, {platform.machine()}, torch {torch.__version__}")
    print(f"max |map − float64 map|, unit frame (× {scale} for voxels of the longest axis)")
    for index, pair in enumerate(("random pair", "real MR pair")):
        reference_error = float((reference_fp32[index] - truth[index]).abs().max())
        ours_error = float((ours_fp32[index] - truth[index]).abs().max())
        print(f"{pair:>13}: reference float32 {reference_error:.2e}, ours float32 {ours_error:.2e}")


if __name__ == "__main__":
    main()
