"""Import and export of steering vectors made by other tools.

llama.cpp GGUF control vectors
    ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (model type),
    ``controlvector.layer_count``, and one F32 tensor ``direction.N`` of ``n_embd`` values per
    layer.  **Layer numbering:** llama.cpp adds ``direction.N`` to the output of decoder layer
    ``N`` counted from 0 (its graph calls the control vector at the end of block ``il`` with
    ``il = N``), which is exactly steerkernel's ``resid_post`` at layer ``N``: indices map
    one-to-one.  llama.cpp rejects ``direction.0`` (it never steers the first block's output),
    so exporting a bank that includes layer 0 is refused; drop it with
    ``bank.select_layers(...)``.  repeng writes the same format with the same numbering.
    The vector in the file carries its magnitude (llama.cpp multiplies it by the user's
    ``--control-vector-scaled`` factor); see :func:`export_gguf` for the scale written.

repeng / steering-vectors style plain vectors
    A ``.safetensors`` file or a ``.pt`` dict (read with ``torch.load(weights_only=True)``;
    pickled objects are refused) mapping layer -> ``[d]`` vector.  Keys may be ints or strings
    ending in the layer index (``"12"``, ``"direction.12"``, ``"layers.12"``,
    ``"model.layers.12"``); a single ``[L, d]`` tensor means layers ``0..L-1``.  The layer is
    the 0-based decoder layer whose output the vector is added to.

Imported vectors become a one-concept :class:`ConceptBank` (unit direction + natural norm).
Its statistics are unknown (NaN) unless a model is given, in which case they are measured on
the built-in neutral texts (:func:`steerkernel.concepts.extract.calibrate`).
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import BankFormatError, BankMismatchError
from ..fileio import atomic_write_bytes, check_regular_file, default_file_mode
from ..introspect import text_config
from .bank import ConceptBank
from .bankfile import GGUF_ARCH as ARCH
from .bankfile import MAX_VECTOR_TENSORS, load_torch_file
from .bankfile import layer_of_key, read_gguf_vectors  # noqa: F401 (public here too)


def bank_from_vectors(vectors: Mapping[int, Tensor], name: str, *, model=None, tokenizer=None,
                      source: str = "vectors", metadata: Optional[dict] = None) -> ConceptBank:
    """A one-concept bank from ``{layer: [d] vector}`` (any float dtype).

    The directions are the normalised vectors and ``vector_norms`` their norms.  With a
    ``model`` the bank is checked against it and calibrated (baseline, residual norms, default
    layer); otherwise those statistics are NaN (unknown) and the default layer is the middle
    one (:meth:`ConceptBank.from_vectors`).
    """
    bank = ConceptBank.from_vectors(vectors, name, source=source, metadata=metadata)
    return _calibrated(bank, model, tokenizer)


def _calibrated(bank: ConceptBank, model, tokenizer) -> ConceptBank:
    """``bank`` checked against and calibrated on ``model`` (unchanged when it is None)."""
    if model is None:
        return bank
    from .extract import calibrate, choose_default_layer

    bank.check_fits(model)
    bank = calibrate(bank, model, tokenizer)
    n = int(text_config(model).num_hidden_layers)
    return bank._replace(default_layer=choose_default_layer(bank.layers, n))


# ------------------------------------------------------------------------------ GGUF
def export_gguf(bank: ConceptBank, concept: str, path: Union[str, os.PathLike], *,
                strength: Optional[float] = None, model_hint: Optional[str] = None) -> None:
    """Write concept ``concept`` of ``bank`` as a llama.cpp control vector (atomically).

    The tensor ``direction.N`` holds ``v_N * s_N`` with ``s_N = vector_norms[N]`` (the
    natural norm) when ``strength`` is None, else ``s_N = strength * resid_norm[N]`` (the
    relative strength convention of steerkernel).  Layer numbering: see the module docs.
    """
    import gguf

    k = bank.concept_index(concept)
    if 0 in bank.layers:
        raise BankMismatchError("llama.cpp control vectors cannot steer layer 0 (direction.0 is "
                                "rejected); export bank.select_layers(bank.layers[1:]) instead")
    if strength is None:
        scale = bank.vector_norms[:, k]
    else:
        if not math.isfinite(strength):
            raise ValueError(f"strength must be finite, got {strength}")
        scale = strength * bank.resid_norm
    if not torch.isfinite(scale).all():
        raise BankMismatchError(f"the scale of {concept!r} is unknown (NaN statistics: calibrate "
                                "the bank first, or give an explicit strength on a calibrated "
                                "bank)")
    hint = model_hint or bank.fingerprint.get("model_type") or bank.metadata.get("model_hint") \
        or bank.fingerprint.get("architecture") or "unknown"
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=folder)
    os.fchmod(fd, default_file_mode())
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", str(hint))
        writer.add_uint32(f"{ARCH}.layer_count", bank.L)
        for i, layer in enumerate(bank.layers):
            vec = (bank.directions[i, k].double() * float(scale[i])).float().numpy()
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vec))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def import_gguf(path: Union[str, os.PathLike], name: Optional[str] = None, *, model=None,
                tokenizer=None) -> ConceptBank:
    """A one-concept bank from a llama.cpp / repeng control vector (see the module docs).
    ``name`` defaults to the file's stem."""
    return _calibrated(ConceptBank.from_gguf(path, name), model, tokenizer)


# ------------------------------------------------------------------------------ plain vectors
def import_vectors(path: Union[str, os.PathLike], name: Optional[str] = None, *, model=None,
                   tokenizer=None) -> ConceptBank:
    """A one-concept bank from a ``.gguf``, ``.safetensors`` or ``.pt`` vector file."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        return import_gguf(path, name, model=model, tokenizer=tokenizer)
    check_regular_file(path, "vector file")
    name = name or os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:  # safetensors checks that the tensors tile the file: copies cost its size
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
                if len(keys) > MAX_VECTOR_TENSORS:
                    raise BankFormatError(f"{path}: {len(keys)} tensors (limit "
                                          f"{MAX_VECTOR_TENSORS})")
                obj = {k: f.get_tensor(k) for k in keys}
        except BankFormatError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise BankFormatError(f"{path}: not a readable safetensors file "
                                  f"({str(e)[:200]})") from None
    elif path.endswith((".pt", ".pth")):
        obj = load_torch_file(path)  # sizes bounded before torch.load allocates them
    else:
        raise BankFormatError(f"{path}: unsupported vector file type (use .gguf, .safetensors "
                              "or .pt)")
    if isinstance(obj, Tensor):
        if obj.dim() != 2:
            raise BankFormatError(f"{path}: a bare tensor must be [L, d], got {tuple(obj.shape)}")
        if obj.shape[0] > MAX_VECTOR_TENSORS:
            raise BankFormatError(f"{path}: {obj.shape[0]} layers (limit {MAX_VECTOR_TENSORS})")
        obj = {i: obj[i] for i in range(obj.shape[0])}
    if not isinstance(obj, Mapping):
        raise BankFormatError(f"{path}: expected a dict of layer -> vector, got "
                              f"{type(obj).__name__}")
    if len(obj) > MAX_VECTOR_TENSORS:
        raise BankFormatError(f"{path}: {len(obj)} vectors (limit {MAX_VECTOR_TENSORS})")
    vectors = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise BankFormatError(f"{path}: value of {key!r} is not a tensor")
        if value.dim() == 2 and 1 in value.shape:
            value = value.reshape(-1)
        if value.dim() != 1:
            raise BankFormatError(f"{path}: vector {key!r} has shape {tuple(value.shape)}, "
                                  "expected [d]")
        layer = layer_of_key(key)
        if layer in vectors:
            raise BankFormatError(f"{path}: two vectors for layer {layer}")
        vectors[layer] = value
    return bank_from_vectors(vectors, name, model=model, tokenizer=tokenizer,
                             source=os.path.basename(path))


def export_vectors(bank: ConceptBank, concept: str, path: Union[str, os.PathLike], *,
                   strength: Optional[float] = None) -> None:
    """Write one concept as a ``.safetensors`` dict ``{"N": [d]}`` (layer N; same scale rule
    as :func:`export_gguf`), readable by :func:`import_vectors`."""
    from safetensors.torch import save

    k = bank.concept_index(concept)
    scale = bank.vector_norms[:, k] if strength is None else strength * bank.resid_norm
    if not torch.isfinite(scale).all():
        raise BankMismatchError(f"the scale of {concept!r} is unknown (NaN statistics)")
    tensors = {str(x): (bank.directions[i, k] * scale[i]).contiguous()
               for i, x in enumerate(bank.layers)}
    atomic_write_bytes(path, save(tensors, metadata={"concept": concept}))
