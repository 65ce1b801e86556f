"""Framework integrations.  :func:`attach` dispatches on the model's framework (HF
transformers for now; the vLLM plugin lives in its own package entry point)."""
from __future__ import annotations


def attach(model, bank, monitor=True, program=None, **kwargs):
    """Monitor and steer ``model`` along ``bank``'s concepts; see
    :func:`steerkernel.integrations.hf.attach` for the arguments.  Imports transformers lazily."""
    from .hf import attach as hf_attach

    return hf_attach(model, bank, monitor=monitor, program=program, **kwargs)


__all__ = ["attach"]
