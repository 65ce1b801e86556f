"""The junction op: its argument definition, validation, registrations and the oracle.

This is the base layer of the op: :mod:`steerkernel.backends` imports it (to register the
kernels) and it imports the backends only lazily, to choose one for a call.
"""
from . import library
from .args import ARGS, SCHEMA, JunctionArgs
from .checks import MODEL_DTYPES
from .junction import PreparedJunction, junction, junction_op, prepare_junction
from .reference import junction_reference_

__all__ = ["junction", "junction_op", "prepare_junction", "PreparedJunction", "JunctionArgs",
           "ARGS", "SCHEMA", "junction_reference_", "library", "MODEL_DTYPES"]
