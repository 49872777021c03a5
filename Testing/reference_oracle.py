"""The reference implementation (icon_registration 1.1.9) as a test oracle, run on the CPU.

Only the minimum is patched, each for a stated reason:
- its builders call ``.cuda()``: ``torch.nn.Module.cuda`` returns the module itself while building;
- its attention forbids the math kernel (``torch.backends.cuda.sdp_kernel(enable_math=False)``),
  the only CPU kernel for its 128-channel keys and 4-channel values: that context is made a no-op;
- its padded-grid values are always float32: cast to the features' dtype so that it also runs in float64;
- ``float64_attention()`` evaluates its attention in float64; used only where gradients are
  compared (one instance-optimization step): the reference's float32 attention gradients are
  noisier than the ±lr steps Adam takes for tiny gradients; the rest runs in float32 as written.
"""
from __future__ import annotations

import contextlib
import types

import pytest
import torch


@contextlib.contextmanager
def float64_attention():
    """Within the block, scaled_dot_product_attention (which only the reference calls) runs in float64."""
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, **kwargs):
        return original(query.double(), key.double(), value.double(), **kwargs).to(query.dtype)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def randomise_zero_initialised(model: torch.nn.Module) -> None:
    """Random output convolutions and BatchNorm statistics (a trained network has both)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lastConv" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def load_reference() -> types.SimpleNamespace:
    try:
        import icon_registration  # noqa: F401
        import icon_registration.carl as carl
    except ImportError as err:  # pragma: no cover - the Makefile installs it
        pytest.fail(f"the reference implementation is not installed: {err} (run `make test`)")
    carl.torch.backends.cuda.sdp_kernel = lambda **kwargs: contextlib.nullcontext()
    original_pad_im = carl.pad_im

    def pad_im(identity, padding):
        return original_pad_im(identity, padding).to(identity.dtype)

    carl.pad_im = pad_im
    return types.SimpleNamespace(carl=carl, losses=__import__("icon_registration.losses").losses)


def build_reference(reference, variant: str, dimension: int, shape, fourth_step: bool, diffusion: bool = False):
    """The reference loss model (``regis_net`` inside) for ``variant``, built on the CPU."""
    import icon_registration as icon

    original_cuda = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        model = getattr(reference.carl, f"make_network_{variant}")([1, 1, *shape], dimension, diffusion=diffusion)
        if fourth_step:
            regis_net = icon.TwoStepRegistration(
                model.regis_net,
                icon.FunctionFromVectorField(icon.networks.tallUNet2(dimension=dimension)),
            )
            model = type(model)(regis_net, icon.LNCC(4), 1.5)
            model.assign_identity_map([1, 1, *shape])
    finally:
        torch.nn.Module.cuda = original_cuda
    return model


def reference_maps(model, moving, fixed):
    """(φ_AB, φ_BA) on the grid from the reference's loss-model forward."""
    with torch.no_grad():
        model(moving, fixed)
    return model.phi_AB_vectorfield, model.phi_BA_vectorfield
