"""Model families as data: where each HF decoder layer keeps its norms and sublayers.

Every supported family is one :class:`Family` row.  A decoder layer of any of them computes
(``N_*`` optional norms, named by attribute; missing ones are the identity)::

    a   = attn(N_pre_attn(h))                       # attention sublayer
    h1  = h + dropout_attn(N_post_attn(a))          # mid junction   (-> fuses N_pre_ffn)
    m   = mlp(N_pre_ffn(h1))                        # feed-forward sublayer
    h2  = h1 + dropout_mlp(N_post_ffn(m))           # end junction   (site resid_post)

Norm kinds: ``rms`` (``x·rsqrt(mean x² + eps)·w``), ``rms1p`` (Gemma: the same with ``1 + w``)
and ``layernorm`` (mean-centred, with bias: never fused by the junction, which only does RMS).
The mid junction fuses ``N_pre_ffn`` when it is an RMS kind.  Nothing else differs between
families, so one fused forward (:mod:`.layers`) serves them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

NORM_KINDS = ("rms", "rms1p", "layernorm")


@dataclass(frozen=True)
class Family:
    """Per-family attributes of a decoder layer (see the module docstring).

    ``layer_classes``: class names the fused forward was checked against (anything else with
    the same ``model_type`` falls back to the generic path).  ``drop_args``: layer arguments that
    the attention does not take; they must be None (e.g. GPT-2's cross-attention inputs).
    """

    name: str
    layer_classes: Tuple[str, ...]
    norm: str
    attn: str = "self_attn"
    mlp: str = "mlp"
    pre_attn: Optional[str] = "input_layernorm"
    post_attn: Optional[str] = None
    pre_ffn: Optional[str] = "post_attention_layernorm"
    post_ffn: Optional[str] = None
    attn_dropout: Optional[str] = None
    mlp_dropout: Optional[str] = None
    drop_args: Tuple[str, ...] = ()

    def norm_names(self) -> Tuple[str, ...]:
        return tuple(n for n in (self.pre_attn, self.post_attn, self.pre_ffn, self.post_ffn)
                     if n is not None)


_SANDWICH = dict(post_attn="post_attention_layernorm", pre_ffn="pre_feedforward_layernorm",
                 post_ffn="post_feedforward_layernorm")

#: ``config.model_type`` -> family.
FAMILIES: Dict[str, Family] = {
    "llama": Family("llama", ("LlamaDecoderLayer",), "rms"),
    "mistral": Family("mistral", ("MistralDecoderLayer",), "rms"),
    "qwen2": Family("qwen2", ("Qwen2DecoderLayer",), "rms"),
    "qwen3": Family("qwen3", ("Qwen3DecoderLayer",), "rms"),
    "gemma": Family("gemma", ("GemmaDecoderLayer",), "rms1p"),
    "gemma2": Family("gemma2", ("Gemma2DecoderLayer",), "rms1p", **_SANDWICH),
    "gemma3_text": Family("gemma3_text", ("Gemma3DecoderLayer",), "rms1p", **_SANDWICH),
    "phi3": Family("phi3", ("Phi3DecoderLayer",), "rms", attn_dropout="resid_attn_dropout",
                   mlp_dropout="resid_mlp_dropout"),
    "gpt2": Family("gpt2", ("GPT2Block",), "layernorm", attn="attn", pre_attn="ln_1",
                   pre_ffn="ln_2", drop_args=("encoder_hidden_states", "encoder_attention_mask")),
    "olmo2": Family("olmo2", ("Olmo2DecoderLayer",), "rms", pre_attn=None,
                    post_attn="post_attention_layernorm", pre_ffn=None,
                    post_ffn="post_feedforward_layernorm"),
}


def family_for(model_type: str) -> Optional[Family]:
    return FAMILIES.get(model_type)


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an HF RMSNorm (``variance_epsilon`` or ``eps``) or an ``nn.LayerNorm``."""
    for attr in ("variance_epsilon", "eps"):
        v = getattr(norm, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    raise AttributeError(f"{type(norm).__name__} has no eps / variance_epsilon")


def check_layer(fam: Family, layer: nn.Module, hidden_size: int) -> Optional[str]:
    """Why ``layer`` does not have the structure ``fam`` describes (None when it does)."""
    cls = type(layer).__name__
    if cls not in fam.layer_classes:
        return f"decoder layer class {cls} is not one of {fam.layer_classes}"
    for name in (fam.attn, fam.mlp, fam.attn_dropout, fam.mlp_dropout):
        if name is not None and not isinstance(getattr(layer, name, None), nn.Module):
            return f"{cls} has no submodule {name!r}"
    for name in fam.norm_names():
        norm = getattr(layer, name, None)
        if not isinstance(norm, nn.Module):
            return f"{cls} has no norm {name!r}"
        w = getattr(norm, "weight", None)
        if w is None or tuple(w.shape) != (hidden_size,):
            return f"{cls}.{name} has no weight of shape ({hidden_size},)"
        if fam.norm == "layernorm":
            if not isinstance(norm, nn.LayerNorm):
                return f"{cls}.{name} is {type(norm).__name__}, expected nn.LayerNorm"
        else:
            # a replaced norm (e.g. a third-party kernel) may not compute what we fuse
            if not (type(norm).__name__.endswith("RMSNorm")
                    and type(norm).__module__.startswith("transformers.")):
                return f"{cls}.{name} is {type(norm).__module__}.{type(norm).__name__}, " \
                       "not a transformers RMSNorm"
            try:
                norm_eps(norm)
            except AttributeError as e:
                return str(e)
    return None
