"""The concept-bank file format: what :meth:`ConceptBank.load` reads and :meth:`ConceptBank.save`
writes, as plain constructor arguments (this module knows nothing of the class).

``.safetensors`` (the format ``save`` writes): tensors ``directions``, ``baseline_mean``,
``baseline_std``, ``vector_norms``, ``resid_norm`` (all F32) and two header metadata strings:
``steerkernel.bank`` (JSON: format, version, names, layers, site, default layer, metadata,
fingerprint) and ``steerkernel.sha256`` (a digest of that JSON and every tensor's name, shape
and bytes).  Reading parses and bounds-checks the header itself before reading any tensor data,
so a truncated, bit-flipped or absurd file raises :class:`BankFormatError` without allocating
more than the file's own size; nothing is ever unpickled.

``.pt``: a dict of the same tensors plus a ``"bank"`` header dict, read by
:func:`load_torch_file`: the zip archive's central directory is checked first (at most
:data:`PT_MAX_MEMBERS` members, at most ``max(PT_MIN_UNCOMPRESSED_CAP, PT_MAX_EXPANSION x file
size)`` bytes uncompressed in all), then ``torch.load(weights_only=True)`` runs, then every
tensor must be a dense CPU float tensor and together they may not view more bytes than the
archive stores (a stride-0 view of one float cannot claim 2^40 elements).

``.gguf``: a llama.cpp / repeng control vector, read as ``{layer: vector}`` by
:func:`read_gguf_vectors` (layer numbering: see :mod:`steerkernel.concepts.interop`).  The
header is walked first with every count and length checked against the bytes left in the file
(the ``gguf`` reader does not check them, and a flipped bit can make it loop over ~2^60 items).
Before any tensor is copied, every tensor's byte range must lie inside the file and no two may
overlap (so the copies together never exceed the file size), with at most
:data:`MAX_VECTOR_TENSORS` tensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zipfile
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
from torch import Tensor

from ..errors import BankFormatError
from ..fileio import PathLike, atomic_write_bytes, check_regular_file

FORMAT = "steerkernel.bank"
VERSION = 1
TENSORS = ("directions", "baseline_mean", "baseline_std", "vector_norms", "resid_norm")
META_KEY = "steerkernel.bank"
HASH_KEY = "steerkernel.sha256"
#: largest safetensors header we accept (the JSON part; names and metadata only)
MAX_HEADER_BYTES = 64 << 20
#: a ``.pt`` archive may hold at most this many members
PT_MAX_MEMBERS = 100_000
#: a ``.pt`` archive may expand to at most this many times its file size ...
PT_MAX_EXPANSION = 8
#: ... or to this many bytes, whichever is larger (small files)
PT_MIN_UNCOMPRESSED_CAP = 64 << 20
#: most tensors a vector file (GGUF or plain) may hold
MAX_VECTOR_TENSORS = 100_000
#: ``general.architecture`` of a GGUF control vector
GGUF_ARCH = "controlvector"
_LAYER_KEY = re.compile(r"^(?:.*\.)?(\d+)$")


def canonical_json(obj) -> str:
    """The JSON text the header and its digest use (sorted keys, no spaces, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest(meta_json: str, tensors: Mapping[str, Tensor]) -> str:
    """sha256 of the header JSON and of every tensor's name, shape and little-endian bytes."""
    h = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"|{name}|{list(t.shape)}|".encode())
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def not_a_bank(path: str, msg: str) -> BankFormatError:
    """The error for a file at ``path`` that is not a valid concept bank."""
    return BankFormatError(f"{path}: not a valid concept bank: {msg}")


# ------------------------------------------------------------------------------ writing
def bank_header(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON header (``META_KEY``) of a bank with constructor arguments ``fields``."""
    return {"format": FORMAT, "version": VERSION, "names": fields["names"],
            "layers": fields["layers"], "site": fields["site"],
            "default_layer": fields["default_layer"], "metadata": fields["metadata"],
            "fingerprint": fields["fingerprint"]}


def bank_tensors(fields: Mapping[str, Any]) -> Dict[str, Tensor]:
    """The tensors (:data:`TENSORS`) of a bank with constructor arguments ``fields``, each
    contiguous and with its own memory (safetensors refuses tensors that share storage, e.g.
    one NaN tensor passed as both statistics)."""
    out, storages = {}, set()
    for k in TENSORS:
        t = fields[k].contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in storages else t
        storages.add(ptr)
    return out


def write_bank_file(path: PathLike, fields: Mapping[str, Any]) -> None:
    """Write a bank (``fields``: the :class:`ConceptBank` constructor arguments) to ``path``
    as ``.safetensors``, atomically (temp file + rename)."""
    from safetensors.torch import save

    path = os.fspath(path)
    if path.endswith((".pt", ".pth", ".gguf")):
        raise BankFormatError(f"banks are saved as .safetensors, not {path!r} (see "
                              "steerkernel.concepts.interop for GGUF control vectors)")
    tensors = bank_tensors(fields)
    meta_json = canonical_json(bank_header(fields))
    data = save(tensors, metadata={META_KEY: meta_json, HASH_KEY: digest(meta_json, tensors)})
    atomic_write_bytes(path, data)


# ------------------------------------------------------------------------------ reading
def read_bank_file(path: str) -> Dict[str, Any]:
    """The :class:`ConceptBank` constructor arguments stored in the ``.safetensors`` (or
    ``.pt``) bank file ``path``, checked for format, version, completeness and consistent
    shapes.  The constructor validates the values.

    Raises:
        BankFormatError: truncated, corrupted, bit-flipped or inconsistent file.
    """
    if path.endswith((".pt", ".pth")):
        return _read_pt(path)
    with open(path, "rb") as f:
        return _read_safetensors(f, os.fstat(f.fileno()).st_size, path)


def _read_safetensors(f, size: int, path: str) -> Dict[str, Any]:
    def bad(msg):
        return not_a_bank(path, msg)

    if size < 8:
        raise bad(f"file is {size} bytes, too short for a safetensors header (truncated?)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise bad(f"header claims {n} bytes (limit {MAX_HEADER_BYTES}); corrupted file")
    if 8 + n > size:
        raise bad(f"header claims {n} bytes but the file has only {size - 8} after the "
                  "length field (truncated?)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(META_KEY), str) \
            or not isinstance(meta.get(HASH_KEY), str):
        raise bad(f"header lacks the {META_KEY!r} / {HASH_KEY!r} metadata (not a steerkernel "
                  "bank, or corrupted)")
    missing = [t for t in TENSORS if t not in header]
    unknown = [t for t in header if t not in TENSORS]
    if missing or unknown:
        raise bad(f"tensors missing {missing}, unexpected {unknown[:5]}")
    data_len = size - 8 - n
    spans = []
    for name in TENSORS:
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != "F32":
            raise bad(f"tensor {name!r} must be F32, got {info!r:.80}")
        shape, offs = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(s) is int and 0 <= s < 2 ** 40
                                                for s in shape)):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r:.80}")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
            raise bad(f"tensor {name!r} has invalid data offsets {offs!r:.80}")
        nbytes = 4 * math.prod(shape)
        if offs[1] - offs[0] != nbytes:
            raise bad(f"tensor {name!r} of shape {shape} needs {nbytes} bytes but its "
                      f"offsets span {offs[1] - offs[0]}")
        if offs[1] > data_len:
            raise bad(f"tensor {name!r} ends at byte {offs[1]} of a {data_len}-byte data "
                      "section (truncated?)")
        spans.append((offs[0], offs[1], name, shape))
    spans.sort()
    end = 0
    for b, e, name, _ in spans:
        if b != end:
            raise bad(f"tensor data overlaps or leaves gaps (at {name!r})")
        end = e
    if end != data_len:
        raise bad(f"data section is {data_len} bytes but the tensors cover {end} "
                  "(trailing garbage or truncated)")
    # every size is now bounded by the file size: reading the data is safe
    blob = f.read(data_len)
    if len(blob) != data_len:
        raise bad("file shrank while reading (truncated)")
    tensors = {name: torch.from_numpy(np.frombuffer(blob, dtype="<f4", count=(e - b) // 4,
                                                    offset=b).astype(np.float32)
                                      .reshape(shape))
               for b, e, name, shape in spans}
    if digest(meta[META_KEY], tensors) != meta[HASH_KEY]:
        raise bad("checksum mismatch: the file was modified or corrupted")
    try:
        info = json.loads(meta[META_KEY])
    except (ValueError, RecursionError) as e:
        raise bad(f"bank metadata is not valid JSON ({e})") from None
    return _fields(info, tensors, bad)


def _fields(info, tensors: Mapping[str, Tensor], bad) -> Dict[str, Any]:
    if not isinstance(info, dict):
        raise bad("bank metadata is not a JSON object")
    if info.get("format") != FORMAT:
        raise bad(f"format is {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("version") != VERSION:
        raise bad(f"format version {info.get('version')!r} is not supported (this "
                  f"steerkernel reads version {VERSION})")
    need = ("names", "layers", "site", "default_layer", "metadata", "fingerprint")
    missing = [k for k in need if k not in info]
    if missing:
        raise bad(f"bank metadata lacks {missing}")
    names, layers = info["names"], info["layers"]
    if not isinstance(names, list) or not isinstance(layers, list):
        raise bad("names and layers must be lists")
    dirs = tensors["directions"]
    if dirs.dim() != 3 or dirs.shape[:2] != (len(layers), len(names)):
        raise bad(f"directions have shape {tuple(dirs.shape)} but the bank has "
                  f"L={len(layers)} layers and K={len(names)} concepts")
    return dict(names=names, layers=layers, directions=dirs,
                baseline_mean=tensors["baseline_mean"], baseline_std=tensors["baseline_std"],
                vector_norms=tensors["vector_norms"], resid_norm=tensors["resid_norm"],
                default_layer=info["default_layer"], site=info["site"],
                metadata=info["metadata"], fingerprint=info["fingerprint"])


def _pt_uncompressed_bytes(path: str, bad) -> int:
    """Total uncompressed size of the ``.pt`` (zip) archive ``path``, checked against the
    caps from its central directory alone (nothing is decompressed)."""
    size = os.stat(path).st_size
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
        raise bad(f"not a zip-format torch file ({type(e).__name__}: {str(e)[:100]}); only "
                  "zip-format torch.save files are read (with torch.load(weights_only=True)), "
                  "not the legacy format: re-save it with a current torch") from None
    if len(members) > PT_MAX_MEMBERS:
        raise bad(f"the archive has {len(members)} members (limit {PT_MAX_MEMBERS})")
    total = sum(m.file_size for m in members)
    cap = max(PT_MIN_UNCOMPRESSED_CAP, PT_MAX_EXPANSION * size)
    if total > cap:
        raise bad(f"the archive expands to {total} bytes, more than the limit of {cap} "
                  f"(max({PT_MIN_UNCOMPRESSED_CAP}, {PT_MAX_EXPANSION} x the {size}-byte file "
                  "size))")
    return total


def load_torch_file(path: str, bad=None):
    """``torch.load(path, weights_only=True)`` with every size bounded before it is allocated
    (see the module docs).  Raises ``bad(message)`` (default: :class:`BankFormatError`
    naming ``path``)."""
    bad = bad or (lambda msg: BankFormatError(f"{path}: {msg}"))
    stored = _pt_uncompressed_bytes(path, bad)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on corrupt / unsafe files
        raise bad(f"cannot read it with torch.load(weights_only=True) ({type(e).__name__}: "
                  f"{str(e)[:200]})") from None
    viewed = 0
    for where, t in _tensors_in(obj):
        if t.layout != torch.strided or t.device.type != "cpu" or not t.is_floating_point():
            raise bad(f"tensor {where[:80]} is {t.layout} / {t.device} / {t.dtype}; only dense "
                      "CPU float tensors are read")
        viewed += t.numel() * t.element_size()
        if viewed > stored:
            raise bad(f"the tensors view {viewed}+ bytes but the archive stores {stored} "
                      f"(expanded or overlapping views, at {where[:80]})")
    return obj


def _tensors_in(obj) -> List:
    """``[(where, tensor)]`` of every tensor in nested dicts / lists / tuples: iterative (no
    recursion limit) and visiting each container once (a pickle can share sub-objects, which
    would make a naive walk exponential)."""
    found, stack, seen = [], [("", obj)], set()
    while stack:
        where, o = stack.pop()
        if isinstance(o, Tensor):
            found.append((where or "<top>", o))
        elif isinstance(o, (Mapping, list, tuple)) and id(o) not in seen:
            seen.add(id(o))
            items = o.items() if isinstance(o, Mapping) else enumerate(o)
            where = where[:120]  # deep nesting must not grow the labels quadratically
            stack.extend((f"{where}[{str(k)[:40]!r}]", v) for k, v in items)
    return found


def _read_pt(path: str) -> Dict[str, Any]:
    def bad(msg):
        return not_a_bank(path, msg)

    obj = load_torch_file(path, bad)
    if not isinstance(obj, dict) or "bank" not in obj or any(t not in obj for t in TENSORS):
        raise bad(f"a .pt bank is a dict of {list(TENSORS)} plus a 'bank' header dict; for "
                  "plain per-layer vectors use steerkernel.concepts.interop.import_vectors")
    if not all(isinstance(obj[t], Tensor) for t in TENSORS):
        raise bad("bank tensors must be torch tensors")
    return _fields(obj["bank"], {t: obj[t].float() for t in TENSORS}, bad)


# ------------------------------------------------------------------------------ GGUF vectors
# GGUF value types (gguf.GGUFValueType): fixed sizes of the scalars; 8 = string (uint64 length
# + bytes), 9 = array (uint32 item type, uint64 count, items).
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
_GGUF_MAX_NESTING = 8  # arrays of arrays (real files use none)


def _check_gguf_layout(path: str) -> None:
    """Walk the GGUF header (key/values and tensor infos) with every count and length checked
    against the bytes left in the file, before ``gguf.GGUFReader`` sees it.  The reader does
    not check them: a flipped bit that turns a string value into an array makes it loop over
    a count of ~2^60 items past the end of the file, appending an empty view per item, until
    the process runs out of memory.  Here any count or length that cannot fit is a
    :class:`BankFormatError`, so the walk (and then the reader's) is bounded by the file size."""
    import mmap

    size = os.stat(path).st_size
    if size < 24:
        raise BankFormatError(f"{path}: not a readable GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise BankFormatError(f"{path}: not a readable GGUF file (no GGUF magic)")
        # the reader accepts either byte order: a version whose low half is 0 was written
        # big-endian
        bo = ">" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0 else "<"
        off = 8

        def bad(why):
            return BankFormatError(f"{path}: not a readable GGUF file ({why}, at byte {off})")

        def too_long(what):
            return bad(f"{what}: past the end of the {size}-byte file")

        def take(fmt, what):
            nonlocal off
            n = struct.calcsize(fmt)
            if off + n > size:
                raise too_long(what)
            v = struct.unpack_from(bo + fmt, buf, off)[0]
            off += n
            return v

        def skip(n, what):
            nonlocal off
            if n < 0 or off + n > size:
                raise too_long(what)
            off += n

        def string(what):
            skip(take("Q", what + "'s length"), what)

        def value(vtype, what, depth=0):
            if depth > _GGUF_MAX_NESTING:
                raise bad(f"arrays nested more than {_GGUF_MAX_NESTING} deep")
            if vtype in _GGUF_SCALAR_BYTES:
                skip(_GGUF_SCALAR_BYTES[vtype], what)
            elif vtype == _GGUF_STRING:
                string(what)
            elif vtype == _GGUF_ARRAY:
                itype = take("I", what + "'s item type")
                count = take("Q", what + "'s item count")
                if itype in _GGUF_SCALAR_BYTES:
                    skip(count * _GGUF_SCALAR_BYTES[itype], what + "'s items")
                elif itype in (_GGUF_STRING, _GGUF_ARRAY):
                    # each item takes at least 8 (string) or 12 (array) bytes
                    if count * (8 if itype == _GGUF_STRING else 12) > size - off:
                        raise too_long(f"{what} ({count} items)")
                    for _ in range(count):
                        value(itype, "an item of " + what, depth + 1)
                else:
                    raise bad(f"{what} of unknown item type {itype}")
            else:
                raise bad(f"a value of unknown type {vtype}")

        n_tensors = take("Q", "the tensor count")
        n_kv = take("Q", "the key/value count")
        if n_kv * 12 > size - off or n_tensors * 28 > size - off:  # smallest entry each
            raise too_long(f"{n_kv} key/values and {n_tensors} tensors")
        for _ in range(n_kv):
            string("a key")
            value(take("I", "a value type"), "a value")
        for _ in range(n_tensors):
            string("a tensor name")
            n_dims = take("I", "a tensor's dimension count")
            if n_dims > _GGUF_MAX_DIMS:
                raise bad(f"a tensor with {n_dims} dimensions")
            skip(8 * n_dims + 4 + 8, "a tensor's shape, type and offset")


def _check_gguf_extents(path: str, tensors) -> None:
    """Every tensor's bytes lie inside the file and no two overlap, so copying them all costs
    at most the file size; at most :data:`MAX_VECTOR_TENSORS` tensors."""
    if len(tensors) > MAX_VECTOR_TENSORS:
        raise BankFormatError(f"{path}: {len(tensors)} tensors (limit {MAX_VECTOR_TENSORS})")
    size = os.stat(path).st_size
    spans = sorted((int(t.data_offset), int(t.n_bytes), t.name) for t in tensors)
    end, prev = 0, None
    for start, n, name in spans:
        if start < 0 or n < 0 or start + n > size:
            raise BankFormatError(f"{path}: tensor {name[:80]} claims bytes {start}..{start + n}"
                                  f" of a {size}-byte file (truncated or corrupted)")
        if start < end:
            raise BankFormatError(f"{path}: tensors {prev[:80]} and {name[:80]} overlap (each "
                                  "tensor needs its own bytes)")
        end, prev = start + n, name


def layer_of_key(key) -> int:
    """The decoder layer a vector file's key names: an int, or a name ending in ``.N``
    (``"12"``, ``"direction.12"``, ``"model.layers.12"``); below 10^9."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if not 0 <= key < 10 ** 9:
            raise BankFormatError(f"layer index {key} is out of range")
        return int(key)
    m = _LAYER_KEY.match(str(key))
    if not m or len(m.group(1)) > 9:
        raise BankFormatError(f"cannot read a layer index from key {str(key)[:60]!r} (expected "
                              "an int below 10^9 or a name ending in '.N', e.g. 'direction.12')")
    return int(m.group(1))


def read_gguf_vectors(path: PathLike):
    """``({layer: np.ndarray [d]}, model_hint or None)`` from a GGUF control-vector file."""
    import gguf

    path = os.fspath(path)
    check_regular_file(path, "control vector file")
    _check_gguf_layout(path)
    try:
        reader = gguf.GGUFReader(path)
        arch = reader.get_field("general.architecture")
        arch = bytes(arch.parts[-1]).decode("utf-8", "replace") if arch else None
        hint = reader.get_field(f"{GGUF_ARCH}.model_hint")
        hint = bytes(hint.parts[-1]).decode("utf-8", "replace") if hint else None
        tensors = list(reader.tensors)  # views of a read-only memory map: nothing copied yet
    except Exception as e:  # gguf raises assorted errors on a damaged file
        raise BankFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    if arch != GGUF_ARCH:
        raise BankFormatError(f"{path}: general.architecture is {arch!r:.80}, not "
                              f"{GGUF_ARCH!r} (not a control vector)")
    _check_gguf_extents(path, tensors)
    vectors = {}
    for t in tensors:
        name = t.name
        if not name.startswith("direction."):
            continue
        layer = layer_of_key(name)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise BankFormatError(f"{path}: tensor {name[:80]} has type {t.tensor_type.name}; "
                                  "only F32/F16 control vectors are supported")
        if layer in vectors:
            raise BankFormatError(f"{path}: tensor {name[:80]} appears twice")
        vectors[layer] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not vectors:
        raise BankFormatError(f"{path}: no direction.N tensors")
    return vectors, hint


__all__ = ["FORMAT", "VERSION", "TENSORS", "META_KEY", "HASH_KEY", "MAX_HEADER_BYTES",
           "GGUF_ARCH", "PT_MAX_MEMBERS", "PT_MAX_EXPANSION", "PT_MIN_UNCOMPRESSED_CAP",
           "MAX_VECTOR_TENSORS", "canonical_json", "digest", "not_a_bank", "bank_header",
           "bank_tensors", "write_bank_file", "read_bank_file", "load_torch_file", "layer_of_key",
           "read_gguf_vectors"]
