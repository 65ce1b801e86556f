"""The junction op: public functional form, its torch.library registrations and the oracle."""
from . import library
from .junction import MODEL_DTYPES, junction, junction_op, prepare_junction
from .reference import junction_reference_

__all__ = ["junction", "junction_op", "prepare_junction", "junction_reference_", "library",
           "MODEL_DTYPES"]
