"""What steerkernel reads off a loaded model: its text config, its decoder layers, its fingerprint.

One place for the concept banks (extraction, fitting a bank to a model), the HF integration
(where the junctions go) and the vLLM integration (which norms become junction sites):

* :func:`text_config` -- the text part of an HF config (the config itself for plain LMs);
* :func:`find_decoder_layers` -- the decoder stack and its ``nn.ModuleList`` of layers;
* :func:`model_fingerprint` / :func:`weight_hash` -- what a concept bank records about the
  model it was made from, and checks again before it is used.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .errors import UnsupportedModelError

#: the fields of :func:`model_fingerprint` that identify a model (``model_type`` is informative)
FINGERPRINT_FIELDS = ("architecture", "hidden_size", "num_layers", "vocab_size", "weight_hash")


def text_config(model):
    """The text part of an HF model's config (the config itself for plain LMs)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config: not an HF model")
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def find_decoder_layers(model: nn.Module, num_layers: int, layer_classes: Sequence[str] = ()
                        ) -> Tuple[nn.Module, nn.ModuleList]:
    """``(stack, layers)``: the decoder stack (the module whose forward runs the layers and that
    holds the final norm) and its list of ``num_layers`` decoder layers.

    Among the ``nn.ModuleList`` s with ``num_layers`` entries it takes, in this order, the first
    whose entries are of one of ``layer_classes`` (class names, e.g. the text stack of a
    multimodal model rather than its vision tower), ``model.model.layers``, the outermost one.
    """
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and len(mod) > 0]
    if not found:
        raise UnsupportedModelError(
            f"cannot find the {num_layers} decoder layers of {type(model).__name__} "
            "(no nn.ModuleList of that length)")
    preferred = [f for f in found if type(f[1][0]).__name__ in layer_classes]
    inner = getattr(getattr(model, "model", None), "layers", None)
    usual = [f for f in found if f[1] is inner]
    name, mod = (preferred or usual or found)[0]
    stack = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return stack, mod


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of an HF causal LM (its config's ``num_hidden_layers`` layers)."""
    return find_decoder_layers(model, int(text_config(model).num_hidden_layers))[1]


def _sign_sample(t: Tensor, rows: int = 64) -> Optional[bytes]:
    if t.is_meta:
        return None
    t = t.detach()
    if t.dim() >= 2 and t.shape[0] > rows:
        idx = torch.linspace(0, t.shape[0] - 1, rows, device=t.device).round().long()
        t = t.index_select(0, idx)
    bits = torch.signbit(t.float()).reshape(-1).cpu().numpy()
    return f"{list(t.shape)}".encode() + np.packbits(bits).tobytes()


def weight_hash(model) -> Optional[str]:
    """A cheap deterministic hash of a model's weights (``None`` for meta/offloaded weights).

    sha256 over the sign bits of 64 evenly spaced rows of the input embedding and of the first
    parameter of the first and last decoder layers.  Sign bits survive any round-to-nearest
    cast, so fp32 / bf16 / fp16 copies of the same weights hash alike, while different weights
    (another model, a fine-tune, another quantisation) almost surely do not.
    """
    parts = []
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or getattr(emb, "weight", None) is None:
        return None
    parts.append(_sign_sample(emb.weight))
    layers = decoder_layers(model)
    for layer in (layers[0], layers[-1]):
        first = next(iter(layer.parameters()), None)
        if first is not None:
            parts.append(_sign_sample(first))
    if any(p is None for p in parts):
        return None
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:32]


def model_fingerprint(model, with_hash: bool = True) -> dict:
    """``{architecture, hidden_size, num_layers, vocab_size, model_type, weight_hash}`` of an HF
    model (``weight_hash`` only ``with_hash``)."""
    cfg = text_config(model)
    fp = {"architecture": type(model).__name__,
          "hidden_size": int(cfg.hidden_size),
          "num_layers": int(cfg.num_hidden_layers),
          "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0) or None,
          "model_type": getattr(cfg, "model_type", None)}
    if with_hash:
        fp["weight_hash"] = weight_hash(model)
    return fp


__all__ = ["FINGERPRINT_FIELDS", "text_config", "find_decoder_layers", "decoder_layers",
           "weight_hash", "model_fingerprint"]
