"""The junction calls inside an HF model: fused decoder-layer forwards and the generic hook.

:class:`Junctions` adapts an attached model's forwards to its junction sites
(:class:`~steerkernel.integrations.site.JunctionSite`: one per bank layer, plus one plain
add + RMSNorm site) and holds the per-forward state — the rows' :class:`Steering` and this
forward's score views — behind the two call sites of a decoder layer:

* ``mid(residual, x, weight, eps)``: ``h1 = residual + x`` in place, optional fused RMSNorm of
  ``h1`` (the next sublayer's input).  No readout here: the plain add + RMSNorm site (no V).
* ``end(i, residual, x)``: ``h2 = residual + x`` (or just ``residual`` for the generic path) in
  place, then readout into this forward's score buffer and the per-slot intervention, at the
  model's decoder layer ``i`` (site ``resid_post``).

Tensors are ``[T, d]`` row views of the layer's ``[B, S, d]`` activations (``T = B·S``).  The
residual written in place is always a fresh sublayer output, never the layer's input, so no
other holder of a tensor sees it change; ``a + b == b + a`` exactly in IEEE arithmetic, so
adding the layer input into the sublayer output equals the stock ``input + output``.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModelError
from ...steering import SlotTables
from ..site import JunctionSite, Scratch, Steering
from .families import Family, norm_eps


class Junctions:
    """The junction sites of one attached model and their per-forward state.

    Args:
        op: the raw junction op (see :func:`steerkernel.backends.op_for`).
        positions: ``positions[l]`` = bank layer position of decoder layer ``l`` or -1.
        V: per bank layer ``[K, d]`` fp32 directions on the model's device.
        tables: the :class:`SlotTables` (``[L, P, K]``) the op reads.
    """

    def __init__(self, op, positions: List[int], V: List[Tensor], tables: SlotTables,
                 hidden_size: int, device: torch.device):
        self.positions = positions
        self.d = hidden_size
        self.device = device
        self.scratch = Scratch(V[0].shape[0], device, rows=64)
        self.add_norm = JunctionSite(op, self.scratch)
        self.sites = [JunctionSite(op, self.scratch, V=v, tables=tables, layer=i)
                      for i, v in enumerate(V)]
        # per-forward state, set by begin() and cleared by end_forward()
        self.T = -1
        self.steering: Optional[Steering] = None
        self.views: Optional[List[Tensor]] = None
        # (next layer index, layer output, its version counter, its RMSNorm with the next
        # layer's input-norm weight): the hand-over between fused layers
        self.carry: Optional[tuple] = None

    def begin(self, T: int, steering: Optional[Steering], views: Optional[List[Tensor]]
              ) -> None:
        """Set the state of one forward of ``T`` token rows (called by the model pre-hook)."""
        self.scratch.reserve(T)
        self.T, self.steering, self.views = T, steering, views

    def end_forward(self) -> None:
        self.T, self.steering, self.views, self.carry = -1, None, None, None

    def mid(self, residual: Tensor, x: Tensor, weight: Optional[Tensor], eps: float
            ) -> Optional[Tensor]:
        """``residual += x`` in place; returns ``rmsnorm(residual) * weight`` or None."""
        return self.add_norm(residual, x, weight=weight, eps=eps)

    def end(self, layer: int, residual: Tensor, x: Optional[Tensor],
            weight: Optional[Tensor] = None, eps: float = 0.0) -> Optional[Tensor]:
        """``residual (+= x)``, readout and steering at decoder layer ``layer``, in place;
        returns ``rmsnorm(residual) * weight`` (the next layer's input norm) or None."""
        i = self.positions[layer]
        if i < 0:  # not a bank layer: the add (and norm) only
            if x is None and weight is None:
                return None
            return self.add_norm(residual, x, weight=weight, eps=eps)
        if residual.shape[0] != self.T:  # not the forward begin() saw: monitor into scratch
            return self.sites[i](residual, x, weight=weight, eps=eps)
        scores = self.views[i] if self.views is not None else None
        return self.sites[i](residual, x, steering=self.steering, scores=scores, weight=weight,
                             eps=eps)


def _rows(t: Tensor, d: int) -> Tensor:
    """A ``[T, d]`` view of a contiguous ``[..., d]`` tensor (a contiguous copy otherwise)."""
    return t.contiguous().view(-1, d)


def fused_norm_weight(fam: Family, norm: nn.Module, dtype: torch.dtype) -> Tensor:
    """The weight the junction's fused RMSNorm multiplies by: ``w`` (rms) or ``1 + w`` (rms1p).

    ``rms`` weights are used live (in the model's dtype, or fp32); ``rms1p`` ones are
    precomputed in fp32 at attach time.
    """
    w = norm.weight
    if fam.norm == "rms1p":
        return (1.0 + w.detach().float()).contiguous()
    if w.dtype not in (torch.float32, dtype):
        return w.detach().float().contiguous()
    return w


def fusable_norm(fam: Family, name: Optional[str]) -> bool:
    return name is not None and fam.norm in ("rms", "rms1p")


def make_fused_forward(layer: nn.Module, fam: Family, junctions: Junctions, index: int,
                       hidden_size: int, dtype: torch.dtype,
                       next_layer: Optional[nn.Module] = None) -> Callable:
    """A replacement ``forward`` for decoder layer ``index`` of family ``fam``.

    Same signature and result as the stock forward (the layer's output hidden states), with
    both residual adds done by the junction op, the pre-FFN RMSNorm fused into the mid junction
    and readout/steering at the end junction.  Where the family's pre-attention norm is an
    RMSNorm, the end junction also computes ``next_layer``'s input norm and hands it over in
    ``junctions.carry``; layer ``index + 1`` uses it only if it receives exactly this output
    tensor, unmodified (same object, same version counter), and recomputes the norm otherwise.
    """
    d = hidden_size
    attn = getattr(layer, fam.attn)
    mlp = getattr(layer, fam.mlp)
    pre_attn = getattr(layer, fam.pre_attn) if fam.pre_attn else None
    post_attn = getattr(layer, fam.post_attn) if fam.post_attn else None
    pre_ffn = getattr(layer, fam.pre_ffn) if fam.pre_ffn else None
    post_ffn = getattr(layer, fam.post_ffn) if fam.post_ffn else None
    attn_drop = getattr(layer, fam.attn_dropout) if fam.attn_dropout else None
    mlp_drop = getattr(layer, fam.mlp_dropout) if fam.mlp_dropout else None
    fuse = fusable_norm(fam, fam.pre_ffn)
    ffn_weight = fused_norm_weight(fam, pre_ffn, dtype) if fuse else None
    ffn_eps = norm_eps(pre_ffn) if fuse else 0.0
    hand_over = next_layer is not None and fusable_norm(fam, fam.pre_attn)
    next_norm = getattr(next_layer, fam.pre_attn) if hand_over else None
    next_weight = fused_norm_weight(fam, next_norm, dtype) if hand_over else None
    next_eps = norm_eps(next_norm) if hand_over else 0.0
    params = list(inspect.signature(type(layer).forward).parameters.values())[2:]
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    drop_args = fam.drop_args
    cls_name = type(layer).__name__

    def forward(hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if args:
            kwargs.update(zip(positional, args))
        for name in drop_args:
            if kwargs.pop(name, None) is not None:
                raise UnsupportedModelError(
                    f"{cls_name} called with {name}: steerkernel's fused path does not support "
                    "cross-attention; attach with path='generic'")
        shape = hidden_states.shape
        h0 = _rows(hidden_states, d)
        carry, junctions.carry = junctions.carry, None
        if pre_attn is None:
            a_in = hidden_states
        elif (carry is not None and not torch.compiler.is_compiling() and carry[0] == index
              and carry[1] is hidden_states and carry[2] == hidden_states._version):
            a_in = carry[3]  # fused into the previous layer's end junction
        else:
            a_in = pre_attn(hidden_states)
        a = attn(a_in, **kwargs)
        if isinstance(a, tuple):
            a = a[0]
        if post_attn is not None:
            a = post_attn(a)
        if attn_drop is not None:
            a = attn_drop(a)
        h1 = _rows(a, d)
        normed = junctions.mid(h1, h0, ffn_weight, ffn_eps)  # h1 = h0 + a, in place
        if normed is not None:
            m_in = normed.view(shape)
        elif pre_ffn is not None:
            m_in = pre_ffn(h1.view(shape))
        else:
            m_in = h1.view(shape)
        m = mlp(m_in)
        if isinstance(m, tuple):
            m = m[0]
        if post_ffn is not None:
            m = post_ffn(m)
        if mlp_drop is not None:
            m = mlp_drop(m)
        h2 = _rows(m, d)
        # Inference tensors keep no version counter, so an in-place edit of the output by a
        # user hook could not be detected: no hand-over there (the next layer recomputes).
        hand = hand_over and not torch.compiler.is_compiling() and not h2.is_inference()
        # h2 = h1 + m, readout, steering, in place (+ the next layer's input norm)
        normed_next = junctions.end(index, h2, h1, next_weight if hand else None, next_eps)
        out = h2.view(shape)
        if normed_next is not None:
            junctions.carry = (index + 1, out, out._version, normed_next.view(shape))
        return out

    return forward


def make_generic_hook(junctions: Junctions, index: int, hidden_size: int) -> Callable:
    """A forward hook for decoder layer ``index`` of any architecture: one in-place junction
    call (readout and steering, no add) on the layer's output hidden states ``[B, S, d]``."""
    d = hidden_size

    def hook(module: nn.Module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if not isinstance(h, Tensor) or h.shape[-1] != d:
            raise UnsupportedModelError(
                f"{type(module).__name__} returned {type(h).__name__} "
                f"{tuple(getattr(h, 'shape', ()))}; expected hidden states [..., {d}]")
        if h.is_contiguous():
            junctions.end(index, h.view(-1, d), None)
            return None
        r = h.contiguous()
        junctions.end(index, r.view(-1, d), None)
        return (r,) + tuple(output[1:]) if isinstance(output, tuple) else r

    return hook
