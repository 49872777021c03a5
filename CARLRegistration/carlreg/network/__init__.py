"""CARL's networks: Ξ (feature net + coordinate attention), Ψ (U-Net), ICON's wrappers, and uniCARL."""
from .attention import AttentionRegistration, FeatureNet, coordinate_attention
from .build import FIRST_STEPS, VARIANTS, CARLConfig, build_carl, build_from_config, set_box
from .unet import UNet
from .unicarl import build_unicarl, load_unicarl_checkpoint
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
    "build_unicarl",
    "coordinate_attention",
    "load_unicarl_checkpoint",
    "set_box",
]
