"""carlreg: CARL image registration (Greer et al., CVPR 2025) without Slicer.

The engine of the CARLRegistration 3D Slicer extension: networks, maps, losses, instance
optimization, registration of images in physical space, training, and the command line.

>>> import carlreg
>>> result = carlreg.register("moving.nii.gz", "fixed.nii.gz", model="path/to/model.pt")
>>> result.transform  # SimpleITK DisplacementFieldTransform, fixed → moving, LPS mm

The top-level names are imported on first use, so that ``carlreg.worker`` (used by the Slicer
module's GUI process) imports neither torch nor SimpleITK.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "CARLConfig": "carlreg.network",
    "build_carl": "carlreg.network",
    "load_model": "carlreg.models",
    "RegistrationResult": "carlreg.pipeline",
    "register": "carlreg.pipeline",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'carlreg' has no attribute {name!r}")
