"""CARL's networks: Ξ (feature net + coordinate attention), Ψ (U-Net) and ICON's wrappers."""
from .attention import AttentionRegistration, FeatureNet, coordinate_attention
from .build import FIRST_STEPS, VARIANTS, CARLConfig, build_carl, build_from_config
from .unet import UNet
from .wrappers import Down, FunctionFromVectorField, RegistrationModule, TwoStep

__all__ = [
    "AttentionRegistration",
    "CARLConfig",
    "Down",
    "FIRST_STEPS",
    "FeatureNet",
    "FunctionFromVectorField",
    "RegistrationModule",
    "TwoStep",
    "UNet",
    "VARIANTS",
    "build_carl",
    "build_from_config",
    "coordinate_attention",
]
