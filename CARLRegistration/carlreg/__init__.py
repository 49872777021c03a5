"""carlreg: CARL image registration (Greer et al., CVPR 2025) without Slicer.

The engine of the CARLRegistration 3D Slicer extension: networks, maps, losses, instance
optimization, registration of images in physical space, training, and the command line.

>>> import carlreg
>>> result = carlreg.register("moving.nii.gz", "fixed.nii.gz", model="path/to/model.pt")
>>> result.transform  # SimpleITK DisplacementFieldTransform, fixed → moving, LPS mm
"""
from .models import load_model
from .network import CARLConfig, build_carl
from .register import RegistrationResult, register

__version__ = "0.1.0"

__all__ = ["CARLConfig", "RegistrationResult", "build_carl", "load_model", "register", "__version__"]
