"""carlreg: CARL image registration (Greer et al., CVPR 2025) without Slicer.

The engine of the CARLRegistration 3D Slicer extension: networks, maps,
losses, instance optimization and inference, importable from plain Python.
"""
from .network import CARLConfig, build_carl

__version__ = "0.1.0"

__all__ = ["CARLConfig", "build_carl", "__version__"]
