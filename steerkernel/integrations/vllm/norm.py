"""The junction at vLLM's fused add+RMSNorm call sites.

vLLM's decoder layers carry ``(hidden_states, residual)`` between layers and call
``input_layernorm(h, residual)`` / ``post_attention_layernorm(h, residual)``; the final
``norm(h, residual)`` closes the stack.  ``RMSNorm`` is a vLLM ``CustomOp``, so an out-of-tree
class registered under its name (``CustomOp.register_oot(name="RMSNorm")``) is what every model
instantiates.  :class:`SteerRMSNorm` is that class: a plain subclass that behaves exactly like
``RMSNorm`` (its ``forward`` is vLLM's dispatched method, custom kernel or native IR op alike)
until the worker gives an instance a *site*; from then on a call with a residual goes through
the site, i.e. through the junction op, which does the add, the concept readout, the
per-request steering and the RMSNorm in one pass.  Which module is which site is decided once
after the model is loaded (:func:`install_sites`): the input norm of decoder layer ``l + 1``
(or the final ``norm`` for the last layer) sees ``residual + h`` = the output of layer ``l``, the
``resid_post`` site of bank layer ``l`` — the same point the HF integration reads.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ...introspect import find_decoder_layers

_CLASS = None


def steer_rmsnorm_class():
    """The :class:`SteerRMSNorm` class (created on first use: it subclasses vLLM's RMSNorm)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from vllm.model_executor.layers.layernorm import RMSNorm

    class SteerRMSNorm(RMSNorm):
        """vLLM's ``RMSNorm``, plus an optional steerkernel junction site (see module doc)."""

        _sk_site = None  # set per instance by install_sites

        def forward(self, x, residual=None):
            site = self._sk_site
            if site is None or residual is None:
                return self._forward_method(x, residual)
            return site(self, x, residual)

    SteerRMSNorm.__qualname__ = "SteerRMSNorm"
    SteerRMSNorm.__module__ = __name__
    _CLASS = SteerRMSNorm
    return SteerRMSNorm


def register_norm() -> bool:
    """Register :class:`SteerRMSNorm` as vLLM's out-of-tree ``RMSNorm`` (idempotent).

    Returns False when another plugin already replaced ``RMSNorm`` (steerkernel then leaves it
    alone and the worker refuses to configure a bank, saying why)."""
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot

    cls = steer_rmsnorm_class()
    have = op_registry_oot.get("RMSNorm")
    if have is cls:
        return True
    if have is not None:
        return False
    name = cls.name  # the in-tree name ("rms_norm"), inherited from RMSNorm
    CustomOp.register_oot(name="RMSNorm")(cls)
    # register_oot renames the class; keep the in-tree name so that custom_ops="+rms_norm" /
    # "-rms_norm" select the same forward for it as for vLLM's own RMSNorm
    cls.name = name
    return True


def _missing(mod) -> bool:
    return mod is None or type(mod).__name__ == "PPMissingLayer"


def site_modules(model: nn.Module, layers: List[int], num_layers: int
                 ) -> List[Optional[nn.Module]]:
    """Per bank layer ``l``: the norm that receives ``residual + h`` = the output of decoder layer
    ``l`` (``layers[l + 1].input_layernorm``, or the stack's final ``norm`` for the last layer),
    or None where that module lives on another pipeline stage.

    Raises :class:`UnsupportedModelError` for architectures whose norms are not vLLM's
    ``RMSNorm`` called with a residual (Gemma's ``GemmaRMSNorm``, sandwich norms, ...)."""
    cls = steer_rmsnorm_class()
    try:
        stack, mods = find_decoder_layers(model, num_layers)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"steerkernel: {e}") from None
    out: List[Optional[nn.Module]] = []
    for l in layers:
        if l + 1 < num_layers:
            layer = mods[l + 1]
            if _missing(layer):
                out.append(None)
                continue
            norm = getattr(layer, "input_layernorm", None)
            where = f"layers[{l + 1}].input_layernorm"
        else:
            norm = getattr(stack, "norm", None)
            where = "norm"
            if _missing(norm):
                out.append(None)
                continue
        if not isinstance(norm, cls):
            raise UnsupportedModelError(
                f"steerkernel: {type(model).__name__}.{where} is "
                f"{type(norm).__module__}.{type(norm).__name__}, not vLLM's RMSNorm (the vLLM "
                "plugin supports decoder stacks whose layers call input_layernorm(h, residual) "
                "with vLLM's RMSNorm: Llama, Mistral, Qwen2/3 and similar)")
        if getattr(norm, "variance_size_override", None) is not None:
            raise UnsupportedModelError(f"steerkernel: {where} normalises over part of the "
                                        "hidden state (var_hidden_size), not supported")
        out.append(norm)
    return out
