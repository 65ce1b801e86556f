"""Concept banks: K named concepts x L layers of unit directions in the residual stream.

A :class:`ConceptBank` holds, for the decoder layers ``layers`` (ascending) of one model and
one site (``"resid_post"``: the residual stream at the output of decoder layer ``l``, i.e. what
``model.model.layers[l]`` returns):

* ``directions  [L, K, d]`` fp32, unit rows ``v_{l,k}``;
* ``baseline_mean [L, K]`` / ``baseline_std [L, K]``: mean and std of the per-token projection
  ``p = v_{l,k} . h`` on neutral text, so ``z = (p - mean) / std``;
* ``vector_norms [L, K]``: the natural norm of each concept vector before normalising;
* ``resid_norm [L]``: the mean residual norm ``||h||`` per layer over the extraction tokens
  (relative steering strengths are ``alpha = strength x resid_norm[l]``).

Statistics may be NaN, meaning "unknown" (a bank imported from bare vectors and not yet
calibrated); directions are always finite.  Steering that needs an unknown statistic fails
with a clear error downstream.

This module is the bank's data and algebra.  Its file format (``.safetensors`` with a checked
header and digest; ``.pt``; GGUF control vectors) is :mod:`.bankfile`; the model fingerprint it
records and checks is :mod:`steerkernel.introspect`.  Banks are made by
:func:`steerkernel.concepts.extract.extract_bank` and imported from other tools' files by
:mod:`steerkernel.concepts.interop`, which both build on this module (never the reverse).
"""
from __future__ import annotations

import json
import math
import os
import unicodedata
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import BankFormatError, BankMismatchError, UnknownConceptError
from ..fileio import PathLike, check_regular_file
from ..introspect import FINGERPRINT_FIELDS, model_fingerprint, text_config, weight_hash
from . import bankfile

#: how far a stored direction's norm may be from 1
UNIT_TOL = 1e-3
#: Unicode categories a concept name may not hold: control characters (ESC, BEL, newline...),
#: surrogates, line and paragraph separators
_NAME_FORBIDDEN_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}
#: bidirectional formatting characters (category Cf) that reorder how a terminal shows text
_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                     "\u2066\u2067\u2068\u2069")


# ------------------------------------------------------------------------------ helpers
def _as_float_tensor(name: str, value, shape: tuple) -> Tensor:
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BankFormatError(f"bank {name} is not a tensor of numbers: {e}") from None
    if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise BankFormatError(f"bank {name} has dtype {value.dtype}; expected a float tensor")
    if tuple(value.shape) != tuple(shape):
        raise BankFormatError(f"bank {name} has shape {tuple(value.shape)}, expected "
                              f"{tuple(shape)}")
    return value.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _as_int(name: str, value) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BankFormatError(f"bank {name} must be an integer, got {value!r}")
    return int(value)


def _check_json(name: str, obj) -> dict:
    if not isinstance(obj, Mapping):
        raise BankFormatError(f"bank {name} must be a dict, got {type(obj).__name__}")
    try:
        return json.loads(bankfile.canonical_json(dict(obj)))
    except (TypeError, ValueError, RecursionError) as e:
        raise BankFormatError(f"bank {name} is not JSON-serialisable (no NaN/inf, str keys): "
                              f"{e}") from None


def name_problem(name) -> Optional[str]:
    """Why ``name`` cannot be a concept name (None if it can): it must be a non-empty string
    without control characters, surrogates, line / paragraph separators or bidirectional
    overrides, which a terminal would interpret when the name is printed."""
    if not isinstance(name, str) or not name.strip():
        return f"must be a non-empty string, got {name!r:.60}"
    for ch in name:
        if ch in _BIDI_CONTROLS or unicodedata.category(ch) in _NAME_FORBIDDEN_CATEGORIES:
            return (f"{name!r:.60} holds the control character U+{ord(ch):04X} (control, "
                    "separator and bidirectional-override characters are not allowed)")
    return None


# ------------------------------------------------------------------------------ the bank
class ConceptBank:
    """K named concepts x L layers of unit residual-stream directions, with statistics.

    Args:
        names: K distinct concept names.
        layers: L distinct decoder-layer indices, ascending.
        directions: ``[L, K, d]`` unit rows (any float dtype; stored fp32 on the CPU).
        baseline_mean, baseline_std: ``[L, K]`` projection mean / std on neutral text
            (NaN = unknown).
        vector_norms: ``[L, K]`` natural norm of each vector before normalising.
        resid_norm: ``[L]`` mean residual norm per layer (NaN = unknown).
        default_layer: one of ``layers``; the layer used when none is named.
        site: where the directions live; ``"resid_post"`` (decoder-layer output).
        metadata: JSON-able dict (method, params, per-concept extras under ``"concepts"``).
        fingerprint: the model the bank was made from (see
            :func:`steerkernel.introspect.model_fingerprint`).

    Raises:
        BankFormatError: any field malformed (shapes disagree, non-unit or non-finite
            directions, duplicate names, unsorted layers, ...).
    """

    def __init__(self, names: Sequence[str], layers: Sequence[int], directions: Tensor,
                 baseline_mean: Tensor, baseline_std: Tensor, vector_norms: Tensor,
                 resid_norm: Tensor, default_layer: int, site: str = "resid_post",
                 metadata: Optional[dict] = None, fingerprint: Optional[dict] = None):
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise BankFormatError(f"bank names must be a list of strings, got {names!r}")
        names = list(names)
        if not names:
            raise BankFormatError("bank has no concepts (names is empty)")
        for n in names:
            problem = name_problem(n)
            if problem:
                raise BankFormatError(f"bank concept name {problem}")
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        if dup:
            raise BankFormatError(f"bank concept names are not unique: {dup}")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, Tensor)):
            raise BankFormatError(f"bank layers must be a list of integers, got {layers!r}")
        layers = [_as_int("layer index", x) for x in layers]
        if not layers:
            raise BankFormatError("bank has no layers")
        if any(x < 0 for x in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise BankFormatError(f"bank layers must be distinct non-negative integers in "
                                  f"ascending order, got {layers}")
        if not isinstance(directions, Tensor) or directions.dim() != 3:
            shape = tuple(directions.shape) if isinstance(directions, Tensor) else None
            raise BankFormatError(f"bank directions must be a [L, K, d] tensor, got "
                                  f"{shape or type(directions).__name__}")
        L, K, d = len(layers), len(names), int(directions.shape[-1])
        if d == 0:
            raise BankFormatError("bank directions have hidden size 0")
        dirs = _as_float_tensor("directions", directions, (L, K, d))
        if not torch.isfinite(dirs).all():
            where = (~torch.isfinite(dirs)).any(-1).nonzero()[0].tolist()
            raise BankFormatError(f"bank directions contain NaN or inf (layer {layers[where[0]]}"
                                  f", concept {names[where[1]]!r})")
        norms = dirs.double().norm(dim=-1)
        off = (norms - 1).abs() > UNIT_TOL
        if off.any():
            i, k = off.nonzero()[0].tolist()
            raise BankFormatError(f"bank direction of concept {names[k]!r} at layer {layers[i]} "
                                  f"has norm {float(norms[i, k]):.6g}, not 1 (directions must "
                                  "be unit vectors)")
        self.names: List[str] = names
        self.layers: List[int] = layers
        self.directions: Tensor = dirs
        self.baseline_mean = self._stat("baseline_mean", baseline_mean, (L, K))
        self.baseline_std = self._stat("baseline_std", baseline_std, (L, K))
        if (self.baseline_std < 0).any():
            raise BankFormatError("bank baseline_std has negative entries")
        self.vector_norms = self._stat("vector_norms", vector_norms, (L, K))
        self.resid_norm = self._stat("resid_norm", resid_norm, (L,))
        if (self.vector_norms < 0).any() or (self.resid_norm < 0).any():
            raise BankFormatError("bank vector_norms / resid_norm have negative entries")
        default_layer = _as_int("default_layer", default_layer)
        if default_layer not in layers:
            raise BankFormatError(f"bank default_layer {default_layer} is not one of its layers "
                                  f"{layers}")
        self.default_layer: int = default_layer
        if not isinstance(site, str) or not site:
            raise BankFormatError(f"bank site must be a non-empty string, got {site!r}")
        self.site: str = site
        self.metadata: dict = _check_json("metadata", metadata or {})
        self.fingerprint: dict = _check_json("fingerprint", fingerprint or {})

    @staticmethod
    def _stat(name: str, value, shape) -> Tensor:
        t = _as_float_tensor(name, value, shape)
        if torch.isinf(t).any():
            raise BankFormatError(f"bank {name} contains inf (NaN is allowed: unknown)")
        return t

    # ---------------------------------------------------------------- shape and lookup
    @property
    def K(self) -> int:
        """Number of concepts."""
        return len(self.names)

    @property
    def L(self) -> int:
        """Number of layers."""
        return len(self.layers)

    @property
    def d(self) -> int:
        """Hidden size."""
        return int(self.directions.shape[-1])

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:8]) + (", ..." if self.K > 8 else "")
        return (f"ConceptBank(K={self.K} [{shown}], layers={self.layers[0]}..{self.layers[-1]} "
                f"(L={self.L}), d={self.d}, site={self.site!r}, "
                f"default_layer={self.default_layer}, method={self.metadata.get('method')!r})")

    def layer_index(self, layer: Optional[int] = None) -> int:
        """Position of decoder layer ``layer`` (default: the default layer) in ``layers``."""
        layer = self.default_layer if layer is None else layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise BankMismatchError(f"layer must be an integer, got {layer!r}")
        if int(layer) not in self.layers:
            raise BankMismatchError(f"layer {layer} is not in the bank (layers: {self.layers})")
        return self.layers.index(int(layer))

    def vectors(self, layer: Optional[int] = None) -> Tensor:
        """``[K, d]`` unit directions at decoder layer ``layer`` (default layer if None)."""
        return self.directions[self.layer_index(layer)]

    def concept_index(self, name: str) -> int:
        """Position of concept ``name``; :class:`UnknownConceptError` lists the known names."""
        if name not in self.names:
            shown = ", ".join(self.names[:30]) + (" ..." if self.K > 30 else "")
            raise UnknownConceptError(f"unknown concept {name!r} (bank has: {shown})")
        return self.names.index(name)

    def recommended(self, name: str) -> Optional[dict]:
        """The steering strength ``steerkernel calibrate`` recommended for concept ``name``
        (``{"strength", "layers", ...}`` from ``metadata["concepts"][name]["recommended"]``),
        or None when it was not calibrated or no strength qualified."""
        self.concept_index(name)
        rec = ((self.metadata.get("concepts") or {}).get(name) or {}).get("recommended")
        if not isinstance(rec, dict) or not isinstance(rec.get("strength"), (int, float)):
            return None
        return rec

    def z(self, scores: Tensor, layer: Optional[int] = None) -> Tensor:
        """z-scores ``(scores - baseline_mean[l]) / baseline_std[l]`` of ``scores [..., K]``
        (projections at decoder layer ``layer``); fp32, same shape."""
        i = self.layer_index(layer)
        if not isinstance(scores, Tensor) or scores.dim() == 0 or scores.shape[-1] != self.K:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise BankMismatchError(f"scores must be a [..., K={self.K}] tensor, got {shape}")
        mu = self.baseline_mean[i].to(scores.device)
        sd = self.baseline_std[i].to(scores.device).clamp_min(1e-12)
        return (scores.float() - mu) / sd

    # ---------------------------------------------------------------- fitting a model
    def check_fits(self, model, check_weights: bool = True) -> None:
        """Raise :class:`BankMismatchError` naming every field where ``model`` differs from
        the bank's fingerprint (architecture, hidden size, layer count, vocab size, weight
        hash), or when the bank's layers or hidden size cannot exist in ``model``."""
        cfg = text_config(model)
        have = model_fingerprint(model, with_hash=False)
        problems = []
        for key in FINGERPRINT_FIELDS[:-1]:
            want = self.fingerprint.get(key)
            if want is not None and have.get(key) is not None and want != have[key]:
                problems.append(f"{key}: bank {want!r}, model {have[key]!r}")
        if self.d != int(cfg.hidden_size) and not any(p.startswith("hidden_size")
                                                       for p in problems):
            problems.append(f"hidden_size: bank {self.d}, model {int(cfg.hidden_size)}")
        n = int(cfg.num_hidden_layers)
        out = [x for x in self.layers if x >= n]
        if out:
            problems.append(f"layers {out} do not exist in a model with {n} decoder layers")
        if check_weights and not problems and self.fingerprint.get("weight_hash"):
            got = weight_hash(model)
            if got is not None and got != self.fingerprint["weight_hash"]:
                problems.append(f"weight_hash: bank {self.fingerprint['weight_hash']}, model "
                                f"{got} (different weights; pass check_weights=False to use "
                                "the bank anyway)")
        if problems:
            raise BankMismatchError("concept bank does not fit this model: "
                                    + "; ".join(problems))

    # ---------------------------------------------------------------- editing
    def _concept_meta(self) -> Dict[str, dict]:
        c = self.metadata.get("concepts")
        return dict(c) if isinstance(c, Mapping) else {}

    def _replace(self, **kw) -> "ConceptBank":
        args = self._fields()
        args.update(kw)
        return ConceptBank(**args)

    def subset(self, names: Iterable[str]) -> "ConceptBank":
        """A bank of only ``names``, in that order."""
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise BankFormatError("subset needs at least one concept name")
        idx = [self.concept_index(n) for n in names]
        meta = dict(self.metadata)
        cm = self._concept_meta()
        if cm:
            meta["concepts"] = {n: cm[n] for n in names if n in cm}
        return self._replace(names=names, directions=self.directions[:, idx],
                             baseline_mean=self.baseline_mean[:, idx],
                             baseline_std=self.baseline_std[:, idx],
                             vector_norms=self.vector_norms[:, idx], metadata=meta)

    def select_layers(self, layers: Iterable[int]) -> "ConceptBank":
        """A bank restricted to ``layers`` (kept in ascending order).  The default layer is
        kept when present, otherwise the selected layer nearest to it."""
        layers = sorted({int(x) for x in layers})
        if not layers:
            raise BankFormatError("select_layers needs at least one layer")
        idx = [self.layer_index(x) for x in layers]
        default = min(layers, key=lambda x: (abs(x - self.default_layer), x))
        return self._replace(layers=layers, directions=self.directions[idx],
                             baseline_mean=self.baseline_mean[idx],
                             baseline_std=self.baseline_std[idx],
                             vector_norms=self.vector_norms[idx],
                             resid_norm=self.resid_norm[idx], default_layer=default)

    def merge(self, other: "ConceptBank") -> "ConceptBank":
        """This bank's concepts followed by ``other``'s.  Both must cover the same layers,
        site and hidden size, have distinct names and compatible fingerprints."""
        if not isinstance(other, ConceptBank):
            raise BankMismatchError(f"can only merge a ConceptBank, got {type(other).__name__}")
        if other.layers != self.layers:
            raise BankMismatchError(f"cannot merge banks over different layers ({self.layers} "
                                    f"vs {other.layers}); use select_layers() first")
        if other.d != self.d or other.site != self.site:
            raise BankMismatchError(f"cannot merge banks of hidden size / site {self.d}/"
                                    f"{self.site!r} and {other.d}/{other.site!r}")
        clash = [n for n in other.names if n in self.names]
        if clash:
            raise BankMismatchError(f"cannot merge: concept names in both banks: {clash}")
        diff = [k for k in FINGERPRINT_FIELDS if self.fingerprint.get(k) is not None
                and other.fingerprint.get(k) is not None
                and self.fingerprint[k] != other.fingerprint[k]]
        if diff:
            raise BankMismatchError("cannot merge banks made for different models (fingerprint "
                                    f"fields differ: {diff})")
        meta = dict(self.metadata)
        if other.metadata.get("method") != self.metadata.get("method"):
            meta["method"] = "merged"
            meta["methods"] = {"first": self.metadata.get("method"),
                               "second": other.metadata.get("method")}
        concepts = self._concept_meta()
        concepts.update(other._concept_meta())
        if concepts:
            meta["concepts"] = concepts
        fp = dict(other.fingerprint)
        fp.update({k: v for k, v in self.fingerprint.items() if v is not None})
        cat = lambda a, b: torch.cat([a, b], 1)  # noqa: E731
        # resid_norm describes the model, not the concepts: keep ours where known
        rn = torch.where(torch.isnan(self.resid_norm), other.resid_norm, self.resid_norm)
        return self._replace(names=self.names + other.names,
                             directions=cat(self.directions, other.directions),
                             baseline_mean=cat(self.baseline_mean, other.baseline_mean),
                             baseline_std=cat(self.baseline_std, other.baseline_std),
                             vector_norms=cat(self.vector_norms, other.vector_norms),
                             resid_norm=rn, metadata=meta, fingerprint=fp)

    def with_concept(self, name: str, vectors, baseline_mean=math.nan, baseline_std=math.nan,
                     **extras) -> "ConceptBank":
        """A bank with one more concept carrying arbitrary vectors.

        Args:
            name: the new concept's name (must not exist yet).
            vectors: ``[d]`` (the same vector at every layer), ``[L, d]`` (one per bank
                layer), or a mapping ``{layer: [d]}`` covering every bank layer.  Each is
                normalised; its norm is kept in ``vector_norms``.
            baseline_mean, baseline_std: scalar or ``[L]`` statistics of the new concept's
                projection on neutral text; NaN (default) = unknown until calibrated (see
                :func:`steerkernel.concepts.extract.calibrate`).
            extras: JSON-able per-concept metadata (e.g. ``valence=0.8``).
        """
        problem = name_problem(name)
        if problem:
            raise BankFormatError(f"concept name {problem}")
        if name in self.names:
            raise BankFormatError(f"concept {name!r} is already in the bank")
        L, d = self.L, self.d
        if isinstance(vectors, Mapping):
            missing = [x for x in self.layers if x not in vectors]
            extra = [x for x in vectors if x not in self.layers]
            if missing or extra:
                raise BankMismatchError(f"vectors for concept {name!r} must cover exactly the "
                                        f"bank layers {self.layers} (missing {missing}, extra "
                                        f"{extra})")
            vectors = torch.stack([torch.as_tensor(vectors[x]).float().reshape(-1)
                                   for x in self.layers])
        v = torch.as_tensor(vectors).detach().float().cpu()
        if v.dim() == 1:
            v = v.expand(L, -1)
        if tuple(v.shape) != (L, d):
            raise BankMismatchError(f"vectors for concept {name!r} have shape "
                                    f"{tuple(v.shape)}; expected [{d}], [{L}, {d}] or a "
                                    "{layer: vector} mapping")
        if not torch.isfinite(v).all():
            raise BankFormatError(f"vectors for concept {name!r} contain NaN or inf")
        n = v.double().norm(dim=-1)
        if (n == 0).any():
            raise BankFormatError(f"vector for concept {name!r} is zero at layer "
                                  f"{self.layers[int((n == 0).nonzero()[0])]}")
        unit = (v.double() / n[:, None]).float()

        def col(x):
            return torch.as_tensor(x, dtype=torch.float32).expand(L).reshape(L, 1)

        meta = dict(self.metadata)
        concepts = self._concept_meta()
        concepts[name] = _check_json("concept extras", dict(extras, source="vector"))
        meta["concepts"] = concepts
        return self._replace(names=self.names + [name],
                             directions=torch.cat([self.directions, unit[:, None]], 1),
                             baseline_mean=torch.cat([self.baseline_mean, col(baseline_mean)], 1),
                             baseline_std=torch.cat([self.baseline_std, col(baseline_std)], 1),
                             vector_norms=torch.cat([self.vector_norms, n.float()[:, None]], 1),
                             metadata=meta)

    # ---------------------------------------------------------------- files
    def _fields(self) -> Dict[str, Any]:
        """The constructor arguments of this bank."""
        return dict(names=self.names, layers=self.layers, directions=self.directions,
                    baseline_mean=self.baseline_mean, baseline_std=self.baseline_std,
                    vector_norms=self.vector_norms, resid_norm=self.resid_norm,
                    default_layer=self.default_layer, site=self.site, metadata=self.metadata,
                    fingerprint=self.fingerprint)

    def save(self, path: PathLike) -> None:
        """Write the bank to ``path`` (``.safetensors``) atomically (temp file + rename)."""
        bankfile.write_bank_file(path, self._fields())

    @classmethod
    def load(cls, path: PathLike) -> "ConceptBank":
        """Read a bank written by :meth:`save` (``.safetensors``), a ``.pt`` dict of the same
        tensors plus a ``"bank"`` header dict (read with ``weights_only=True``), or a GGUF
        control vector (:meth:`from_gguf`).  Plain vector files go through
        :mod:`steerkernel.concepts.interop`.

        Raises:
            FileNotFoundError: no such file.
            BankFormatError: truncated, corrupted, bit-flipped or inconsistent file.
        """
        path = os.fspath(path)
        check_regular_file(path, "concept bank file")
        if path.endswith(".gguf"):
            return cls.from_gguf(path)
        fields = bankfile.read_bank_file(path)
        try:
            return cls(**fields)
        except BankFormatError as e:
            raise bankfile.not_a_bank(path, str(e)) from None

    # ---------------------------------------------------------------- from bare vectors
    @classmethod
    def from_vectors(cls, vectors: Mapping[int, Tensor], name: str, *, source: str = "vectors",
                     metadata: Optional[dict] = None) -> "ConceptBank":
        """A one-concept bank from ``{layer: [d] vector}`` (any float dtype).

        The directions are the normalised vectors and ``vector_norms`` their norms; the
        statistics are NaN (unknown) and the default layer is the middle one.  To measure them
        on a model, use :func:`steerkernel.concepts.interop.bank_from_vectors`.
        """
        if not vectors:
            raise BankFormatError(f"{source}: no vectors found")
        layers = sorted(vectors)
        rows = []
        for x in layers:
            v = torch.as_tensor(vectors[x]).detach().float().cpu().reshape(-1)
            rows.append(v)
        d = rows[0].numel()
        bad = [x for x, v in zip(layers, rows) if v.numel() != d]
        if bad or d == 0:
            raise BankFormatError(f"{source}: vectors have different or zero sizes (layers "
                                  f"{bad})")
        V = torch.stack(rows)  # [L, d]
        if not torch.isfinite(V).all():
            raise BankFormatError(f"{source}: vectors contain NaN or inf")
        norms = V.double().norm(dim=-1)
        if (norms == 0).any():
            raise BankFormatError(f"{source}: the vector at layer "
                                  f"{layers[int((norms == 0).nonzero()[0])]} is zero")
        L = len(layers)
        return cls(names=[name], layers=layers,
                   directions=(V.double() / norms[:, None]).float()[:, None],
                   baseline_mean=torch.full((L, 1), math.nan),
                   baseline_std=torch.full((L, 1), math.nan),
                   vector_norms=norms.float()[:, None], resid_norm=torch.full((L,), math.nan),
                   default_layer=layers[L // 2], site="resid_post",
                   metadata=dict(metadata or {}, method="imported", source=source,
                                 concepts={name: {"source": source}}),
                   fingerprint={"hidden_size": d})

    @classmethod
    def from_gguf(cls, path: PathLike, name: Optional[str] = None) -> "ConceptBank":
        """A one-concept bank (statistics unknown) from a llama.cpp / repeng control vector;
        ``name`` defaults to the file's stem.  With a model to calibrate it on:
        :func:`steerkernel.concepts.interop.import_gguf`."""
        vectors, hint = bankfile.read_gguf_vectors(path)
        path = os.fspath(path)
        name = name or os.path.splitext(os.path.basename(path))[0]
        return cls.from_vectors(vectors, name, source=os.path.basename(path),
                                metadata={"model_hint": hint, "format": "gguf control vector"})
