"""steerkernel: monitor and steer LLMs along concept directions in the residual stream,
with fused kernels at every residual junction.

Start with :func:`steerkernel.ops.junction` (the op) or ``steerkernel doctor`` (what runs here).
"""
from . import backends, ops
from .integrations import attach
from .concepts import ConceptBank, default_bank
from .models import default_model_dir, load_model
from .ops import junction

__version__ = "0.1.0"

__all__ = ["junction", "attach", "ConceptBank", "load_model", "default_model_dir", "ops",
           "backends", "__version__"]
