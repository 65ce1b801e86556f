"""HF transformers integration: :func:`attach` a concept bank to a causal LM.

Fused decoder-layer forwards for the families in :data:`FAMILIES`, a generic forward-hook path
for every other architecture; see :mod:`.attach`.
"""
from .attach import SteeringHandle, attach, check_transformers_version, find_decoder_layers
from .families import FAMILIES, Family
from .trace import TraceStore

__all__ = ["attach", "SteeringHandle", "FAMILIES", "Family", "TraceStore",
           "check_transformers_version", "find_decoder_layers"]
