"""Hostile concept-bank files (GitHub issue #8).

* Truncated files (every cut position is a candidate) and single-bit flips anywhere in a
  ``.safetensors`` bank raise :class:`BankFormatError` -- nothing else, never a crash.  The
  bank's sha256 covers the metadata and every tensor byte, so *every* flip must be caught.
* Crafted files with a correct checksum that claim absurd sizes (header length 2^64-1, shapes of
  2^39, offsets beyond the file, gaps, overlaps) or carry bad contents (NaN / inf / non-unit
  directions, duplicate names, unsorted layers, NaN in the JSON, deep JSON nesting) raise
  ``BankFormatError`` in a child process whose address space may grow by 256 MiB at most, and
  whose peak RSS is checked: nothing is allocated from a size the file merely claims.
* Path tricks: missing files, directories, FIFOs, symlinks to /dev/zero and symlink loops give
  clear errors promptly (a FIFO must not block the loader).
* No pickle: a ``.pt`` file whose unpickling would run code (a ``__reduce__`` that creates a
  marker file) is refused by every loader that reads ``.pt`` (``ConceptBank.load``,
  ``interop.import_vectors``), and no ``torch.load`` in the package runs without
  ``weights_only=True``.
* GGUF control vectors and plain vector files: truncated / bit-flipped files raise
  ``BankFormatError`` or load as a valid bank (unit, finite directions); for GGUF every single
  flip and cut is tried.  The random tests run under an address-space cap (``memory_capped``).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steerkernel.errors import BankFormatError

HAS_BANK = importlib.util.find_spec("steerkernel.concepts.bank") is not None
pytestmark = pytest.mark.skipif(not HAS_BANK,
                                reason="steerkernel/concepts/bank.py does not exist yet")
if HAS_BANK:
    from steerkernel.concepts import bankfile
    from steerkernel.concepts.bank import ConceptBank

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def FUZZ(n):
    return settings(max_examples=n, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])




COUNTS = {"truncations": 0, "bit_flips": 0, "crafted": 0, "gguf": 0, "vector_files": 0}


def make_bank(K=3, L=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(L, K, d, generator=g, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=-1, keepdim=True)).float()
    return ConceptBank(names=["calm", "fear", "joy", "x", "y"][:K], layers=[1, 4, 6][:L],
                       directions=dirs, baseline_mean=torch.randn(L, K, generator=g),
                       baseline_std=torch.rand(L, K, generator=g) + 0.5,
                       vector_norms=torch.rand(L, K, generator=g) + 1,
                       resid_norm=torch.rand(L, generator=g) * 10 + 1,
                       default_layer=[1, 4, 6][L - 1], site="resid_post",
                       metadata={"method": "test", "note": "ü"},
                       fingerprint={"hidden_size": d, "num_layers": 8})


def assert_valid(bank):
    """Invariants every loaded bank satisfies."""
    assert isinstance(bank, ConceptBank)
    L, K, d = bank.directions.shape
    assert L == len(bank.layers) and K == len(bank.names) and d > 0
    assert torch.isfinite(bank.directions).all()
    assert ((bank.directions.double().norm(dim=-1) - 1).abs() < 1e-2).all()
    assert len(set(bank.names)) == K
    assert bank.layers == sorted(set(bank.layers)) and bank.default_layer in bank.layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid bank file and its bytes."""
    path = tmp_path_factory.mktemp("bank") / "bank.safetensors"
    make_bank().save(path)
    return path, path.read_bytes()


def test_round_trip_is_exact(saved):
    path, _ = saved
    a, b = make_bank(), ConceptBank.load(path)
    assert_valid(b)
    assert (a.names, a.layers, a.site, a.default_layer, a.metadata, a.fingerprint) == \
        (b.names, b.layers, b.site, b.default_layer, b.metadata, b.fingerprint)
    for t in bankfile.TENSORS:
        assert torch.equal(getattr(a, t), getattr(b, t)), t


def _load_bytes(tmp_path, data: bytes, name="f.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    return ConceptBank.load(p)


# ------------------------------------------------------------------------ truncation, flips
@FUZZ(200)
@given(frac=st.floats(0, 1, exclude_max=True))
def test_truncated_bank_is_rejected(saved, tmp_path, frac, memory_capped):
    _, data = saved
    cut = int(frac * len(data))
    with pytest.raises(BankFormatError):
        _load_bytes(tmp_path, data[:cut])
    COUNTS["truncations"] += 1


def test_truncation_at_every_boundary(saved, tmp_path):
    """Cuts at the structural boundaries: inside / at the end of the length prefix, of the
    header, of every tensor, and one byte short of the whole file."""
    _, data = saved
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    cuts = {0, 1, 7, 8, 9, 8 + n - 1, 8 + n, len(data) - 1}
    for name, info in header.items():
        if name != "__metadata__":
            b, e = info["data_offsets"]
            cuts |= {8 + n + b, 8 + n + e - 1}
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        with pytest.raises(BankFormatError):
            _load_bytes(tmp_path, data[:cut])
        COUNTS["truncations"] += 1


@FUZZ(300)
@given(data=st.data())
def test_every_bit_flip_is_detected(saved, tmp_path, data, memory_capped):
    """The file carries a sha256 of its metadata and tensors and the structure is checked, so
    a single flipped bit anywhere must give BankFormatError (never a bank, never another
    exception)."""
    _, blob = saved
    pos = data.draw(st.integers(0, len(blob) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(blob)
    flipped[pos] ^= 1 << bit
    with pytest.raises(BankFormatError):
        _load_bytes(tmp_path, bytes(flipped))
    COUNTS["bit_flips"] += 1


def test_appended_bytes_are_rejected(saved, tmp_path):
    _, data = saved
    for extra in (b"\0", b" ", data[-4:], b"\0" * 4096):
        with pytest.raises(BankFormatError):
            _load_bytes(tmp_path, data + extra)


# ------------------------------------------------------------------------ crafted files
def _craft(header: dict, meta: dict, tensors: dict, *, data: bytes = None,
           length: int = None, digest: bool = True, header_bytes: bytes = None) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data.

    ``tensors`` maps name -> float32 tensor (laid out in order); ``header`` entries override
    the generated ones; ``meta`` is the bank's JSON header (the sha256 is recomputed with the
    loader's own digest function when ``digest``)."""
    hdr, blobs, off = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().astype("<f4").tobytes()
        hdr[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    meta_json = json.dumps(meta) if not isinstance(meta, str) else meta
    md = {bankfile.META_KEY: meta_json,
          bankfile.HASH_KEY: bankfile.digest(meta_json, tensors) if digest else "0" * 64}
    hdr["__metadata__"] = md
    hdr.update(header)
    hb = header_bytes if header_bytes is not None else json.dumps(hdr).encode()
    hb += b" " * (-len(hb) % 8)
    body = data if data is not None else b"".join(blobs)
    return struct.pack("<Q", len(hb) if length is None else length) + hb + body


def _parts(K=3, L=2, d=8):
    b = make_bank(K, L, d)
    tensors = {t: getattr(b, t).clone() for t in bankfile.TENSORS}
    return bankfile.bank_header(b._fields()), tensors


def _crafted_cases():
    """(name, file bytes) of hostile banks; each must raise BankFormatError."""
    meta, t = _parts()
    cases = []

    def add(name, **kw):
        m = kw.pop("meta", meta)
        ts = kw.pop("tensors", t)
        cases.append((name, _craft(kw.pop("header", {}), m, ts, **kw)))

    def with_meta(**changes):
        return {**meta, **changes}

    def with_tensor(name, value):
        return {**t, name: value}

    # sizes the file only claims
    add("header length 2^64-1", length=2**64 - 1)
    add("header length 2^63", length=2**63)
    add("header length just under the limit", length=bankfile.MAX_HEADER_BYTES - 8)
    add("header length one past the file", length=10**6)
    huge = {"dtype": "F32", "shape": [2**39, 2**39, 2**39], "data_offsets": [0, 4 * 2**117]}
    add("shape 2^39 cubed", header={"directions": huge})
    add("consistent huge tensor past the end",
        header={"directions": {"dtype": "F32", "shape": [2**20, 2**20, 4],
                               "data_offsets": [0, 4 * 2**42]}})
    add("shape entry 2^40", header={"resid_norm": {"dtype": "F32", "shape": [2**40],
                                                   "data_offsets": [0, 2**42]}})
    add("negative shape", header={"resid_norm": {"dtype": "F32", "shape": [-2],
                                                 "data_offsets": [0, 8]}})
    add("float shape", header={"resid_norm": {"dtype": "F32", "shape": [2.0],
                                              "data_offsets": [0, 8]}})
    add("bool shape", header={"resid_norm": {"dtype": "F32", "shape": [True, True],
                                             "data_offsets": [0, 4]}})
    add("offsets reversed", header={"resid_norm": {"dtype": "F32", "shape": [2],
                                                   "data_offsets": [8, 0]}})
    add("offsets as strings", header={"resid_norm": {"dtype": "F32", "shape": [2],
                                                     "data_offsets": ["0", "8"]}})
    add("offsets overlap another tensor", header={"resid_norm": {
        "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    add("F64 dtype", header={"resid_norm": {"dtype": "F64", "shape": [1],
                                            "data_offsets": [0, 8]}})
    add("unknown dtype", header={"resid_norm": {"dtype": "Q4_K", "shape": [2],
                                                "data_offsets": [0, 8]}})
    add("tensor info not a dict", header={"resid_norm": [1, 2]})
    add("extra tensor", header={"evil": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})
    add("missing tensor", tensors={k: v for k, v in t.items() if k != "vector_norms"})
    add("trailing data", data=b"".join(v.numpy().astype("<f4").tobytes() for v in t.values())
        + b"\0" * 64)
    add("wrong checksum", digest=False)
    add("header not JSON", header_bytes=b"{not json")
    add("header not UTF-8", header_bytes=b'{"\xff\xfe": 1}')
    add("header a JSON list", header_bytes=b"[1, 2, 3]")
    add("header without metadata", header_bytes=json.dumps({
        k: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for k in t}).encode())
    add("metadata values not strings", header={"__metadata__": {bankfile.META_KEY: {"a": 1},
                                                                bankfile.HASH_KEY: 5}})
    # well-formed container, bad bank (checksum recomputed, so the contents are reached)
    add("bank metadata not JSON", meta="{broken")
    add("bank metadata with NaN", meta='{"format": "steerkernel.bank", "version": 1, '
        '"names": ["calm", "fear", "joy"], "layers": [1, 4], "site": "resid_post", '
        '"default_layer": 4, "metadata": {"x": NaN}, "fingerprint": {}}')
    add("wrong format", meta=with_meta(format="pickle"))
    add("future version", meta=with_meta(version=99))
    add("names not a list", meta=with_meta(names="calm,fear,joy"))
    add("duplicate names", meta=with_meta(names=["calm", "calm", "joy"]))
    add("empty name", meta=with_meta(names=["calm", " ", "joy"]))
    add("non-string name", meta=with_meta(names=["calm", 7, "joy"]))
    add("fewer names than K", meta=with_meta(names=["calm", "fear"]))
    add("unsorted layers", meta=with_meta(layers=[4, 1]))
    add("negative layer", meta=with_meta(layers=[-1, 4]))
    add("float layer", meta=with_meta(layers=[1.5, 4]))
    add("bool layer", meta=with_meta(layers=[True, 4]))
    add("default layer not a layer", meta=with_meta(default_layer=5))
    add("empty site", meta=with_meta(site=""))
    add("metadata not a dict", meta=with_meta(metadata=[1, 2]))
    add("missing field", meta={k: v for k, v in meta.items() if k != "layers"})
    add("NaN direction", tensors=with_tensor("directions", t["directions"].clone().index_fill_(
        2, torch.tensor([3]), math.nan)))
    add("inf direction", tensors=with_tensor("directions", t["directions"] * math.inf))
    add("non-unit direction", tensors=with_tensor("directions", t["directions"] * 2))
    add("zero direction", tensors=with_tensor("directions", t["directions"] * 0))
    add("direction shape disagrees with names",
        tensors=with_tensor("directions", t["directions"][:, :2].contiguous()))
    add("2-D directions", tensors=with_tensor("directions", t["directions"][0].contiguous()))
    add("zero hidden size", tensors=with_tensor("directions", torch.zeros(2, 3, 0)))
    add("inf resid_norm", tensors=with_tensor("resid_norm", torch.full((2,), math.inf)))
    add("negative baseline_std", tensors=with_tensor("baseline_std", -t["baseline_std"]))
    add("stat of the wrong shape", tensors=with_tensor("baseline_mean", torch.zeros(3, 2)))
    return cases


CRAFT_CHILD = textwrap.dedent(r'''
    import json, resource, sys, time
    from steerkernel.concepts.bank import ConceptBank
    from steerkernel.errors import BankFormatError
    pages = int(open("/proc/self/statm").read().split()[0])
    resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + (256 << 20),
                                            resource.RLIM_INFINITY))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for path in sys.argv[1:]:
        print("BEGIN", path, flush=True)
        t = time.time()
        try:
            ConceptBank.load(path)
            out[path] = ["accepted", ""]
        except BankFormatError as e:
            out[path] = ["BankFormatError", str(e)[:300]]
        except BaseException as e:
            out[path] = [type(e).__name__, str(e)[:300]]
        out[path].append(round(time.time() - t, 3))
    out["__rss_growth_kib__"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    print("RESULT " + json.dumps(out), flush=True)
''')


def _run_craft_child(paths, timeout=300):
    proc = subprocess.run([sys.executable, "-c", CRAFT_CHILD, *map(str, paths)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = proc.stdout.splitlines()
    last = next((ln for ln in reversed(lines) if ln.startswith("BEGIN")), "<none>")
    assert proc.returncode == 0 and lines and lines[-1].startswith("RESULT "), \
        f"child died (rc={proc.returncode}) during {last}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][7:])


def test_crafted_banks_fail_cleanly_without_allocating(tmp_path):
    cases = _crafted_cases()
    paths = []
    for i, (name, blob) in enumerate(cases):
        p = tmp_path / f"case{i:02d}.safetensors"
        p.write_bytes(blob)
        paths.append(p)
    res = _run_craft_child(paths)
    growth = res.pop("__rss_growth_kib__")
    wrong = [f"{name}: {res[str(p)][0]} {res[str(p)][1]}" for (name, _), p in zip(cases, paths)
             if res[str(p)][0] != "BankFormatError"]
    assert not wrong, "\n".join(wrong)
    slow = [name for (name, _), p in zip(cases, paths) if res[str(p)][2] > 2.0]
    assert not slow, f"slow rejections: {slow}"
    assert growth < 64 * 1024, f"peak RSS grew by {growth} KiB while rejecting crafted files"
    for (name, _), p in zip(cases, paths):
        assert str(p) in res[str(p)][1], f"{name}: the error does not name the file"
    COUNTS["crafted"] += len(cases)


def test_deeply_nested_json_is_a_format_error(tmp_path):
    """json.loads of a deeply nested header (or of the bank's own JSON, whose checksum an
    attacker simply recomputes) raises RecursionError; it must surface as BankFormatError."""
    meta, t = _parts()
    deep = "[" * 200_000 + "]" * 200_000
    files = {"safetensors header": _craft({}, meta, t,
                                          header_bytes=('{"x": %s}' % deep).encode()),
             "bank metadata": _craft({}, json.dumps(meta)[:-1] + ', "deep": %s}' % deep, t)}
    paths = []
    for i, blob in enumerate(files.values()):
        paths.append(tmp_path / f"deep{i}.safetensors")
        paths[-1].write_bytes(blob)
    res = _run_craft_child(paths)
    wrong = {w: res[str(p)][:1] for w, p in zip(files, paths)
             if res[str(p)][0] != "BankFormatError"}
    assert not wrong, wrong


def test_many_concepts_load_in_linear_time(tmp_path):
    """A quadratic duplicate-name check would make a crafted 1 MB bank with 40,000
    one-dimensional concepts take ~40 s (it did once); linear takes well under a second."""
    K = 40_000
    names = [f"c{i}" for i in range(K)]
    t = {"directions": torch.ones(1, K, 1), "baseline_mean": torch.zeros(1, K),
         "baseline_std": torch.ones(1, K), "vector_norms": torch.ones(1, K),
         "resid_norm": torch.ones(1)}
    meta = {"format": bankfile.FORMAT, "version": bankfile.VERSION, "names": names,
            "layers": [0], "site": "resid_post", "default_layer": 0, "metadata": {},
            "fingerprint": {}}
    p = tmp_path / "wide.safetensors"
    p.write_bytes(_craft({}, meta, t))
    try:
        res = _run_craft_child([p], timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading a {p.stat().st_size >> 10} KiB bank with K={K} took > 15 s")
    assert res[str(p)][0] == "accepted" and res[str(p)][2] < 5, res[str(p)]


# ------------------------------------------------------------------------ paths
PATH_CHILD = textwrap.dedent(r'''
    import json, signal, sys, time
    from steerkernel.concepts.bank import ConceptBank

    def too_slow(*_):
        raise TimeoutError("blocked for 10 s")

    signal.signal(signal.SIGALRM, too_slow)
    out = {}
    for path in sys.argv[1:]:
        print("BEGIN", path, flush=True)
        signal.alarm(10)  # a FIFO or a device must not block or stream forever
        try:
            ConceptBank.load(path)
            out[path] = ["accepted", ""]
        except BaseException as e:
            out[path] = [type(e).__name__, str(e).replace("\\n", " ")]
        signal.alarm(0)
    print("RESULT " + json.dumps(out), flush=True)
''')
TRICKS = ["missing", "directory", "/dev/zero symlink", "/dev/urandom symlink (.pt)", "fifo",
          "symlink loop", "dangling symlink", "empty file", "empty .pt", "empty .gguf"]


def _path_tricks(tmp_path):
    tricks = {"missing": tmp_path / "nope.safetensors"}
    tricks["directory"] = tmp_path / "dir.safetensors"
    tricks["directory"].mkdir()
    tricks["/dev/zero symlink"] = tmp_path / "zero.safetensors"
    tricks["/dev/zero symlink"].symlink_to("/dev/zero")
    tricks["/dev/urandom symlink (.pt)"] = tmp_path / "rand.pt"
    tricks["/dev/urandom symlink (.pt)"].symlink_to("/dev/urandom")
    tricks["fifo"] = tmp_path / "fifo.safetensors"
    os.mkfifo(tricks["fifo"])
    tricks["symlink loop"] = tmp_path / "loop.safetensors"
    tricks["symlink loop"].symlink_to(tmp_path / "loop.safetensors")
    tricks["dangling symlink"] = tmp_path / "dangling.safetensors"
    tricks["dangling symlink"].symlink_to(tmp_path / "gone.safetensors")
    tricks["empty file"] = tmp_path / "empty.safetensors"
    tricks["empty file"].write_bytes(b"")
    tricks["empty .pt"] = tmp_path / "empty.pt"
    tricks["empty .pt"].write_bytes(b"")
    tricks["empty .gguf"] = tmp_path / "empty.gguf"
    tricks["empty .gguf"].write_bytes(b"")
    assert sorted(tricks) == sorted(TRICKS)
    return tricks


@pytest.fixture(scope="module")
def path_results(tmp_path_factory):
    """Load every path trick in one child (with a 10 s alarm each): {trick: (kind, msg)}."""
    tricks = _path_tricks(tmp_path_factory.mktemp("paths"))
    proc = subprocess.run([sys.executable, "-c", PATH_CHILD, *map(str, tricks.values())],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = proc.stdout.splitlines()
    last = next((ln for ln in reversed(lines) if ln.startswith("BEGIN")), "<none>")
    assert proc.returncode == 0 and lines and lines[-1].startswith("RESULT "), \
        f"child died (rc={proc.returncode}) during {last}\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1][7:])
    return {name: (path, *res[str(path)]) for name, path in tricks.items()}


@pytest.mark.parametrize("trick", TRICKS)
def test_path_tricks_give_clear_errors(path_results, trick):
    """Each fails promptly (a FIFO or a device must not block or stream forever) with an
    OSError or BankFormatError that names the path."""
    path, kind, msg = path_results[trick]
    assert kind in ("BankFormatError", "FileNotFoundError", "IsADirectoryError",
                    "PermissionError", "OSError"), f"{trick}: {kind}: {msg}"
    assert str(path) in msg, f"{trick}: the message does not name the path: {msg}"


@pytest.mark.parametrize("trick", ["directory", "/dev/zero symlink", "fifo"])
def test_existing_non_files_are_not_called_missing(path_results, trick):
    """An existing directory, device or FIFO is reported as what it is, not as missing."""
    path, kind, msg = path_results[trick]
    assert "does not exist" not in msg, f"{trick}: {kind}: {msg}"


# ------------------------------------------------------------------------ no pickle
class _Boom:
    """Unpickling this runs ``open(marker, "w")``: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickles(tmp_path):
    marker = tmp_path / "PWNED"
    b = make_bank()
    bank_dict = {t: getattr(b, t) for t in bankfile.TENSORS}
    files = {
        "bare object": _Boom(marker),
        "bank dict with a payload": {**bank_dict, "bank": bankfile.bank_header(b._fields()),
                                     "x": _Boom(marker)},
        "payload as the bank header": {**bank_dict, "bank": _Boom(marker)},
        "vector dict with a payload": {"1": torch.ones(8), "2": _Boom(marker)},
    }
    paths = {}
    for i, (name, obj) in enumerate(files.items()):
        p = tmp_path / f"evil{i}.pt"
        torch.save(obj, p)
        paths[name] = p
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(paths["bare object"].read_bytes())
    paths["pickle named .safetensors"] = disguised
    return marker, paths


def _loaders():
    from steerkernel.concepts import interop

    return {"ConceptBank.load": ConceptBank.load, "interop.import_vectors":
            interop.import_vectors}


@pytest.mark.parametrize("loader", ["ConceptBank.load", "interop.import_vectors"])
def test_pickles_are_never_executed(tmp_path, loader):
    marker, paths = _pickles(tmp_path)
    load = _loaders()[loader]
    for name, p in paths.items():
        with pytest.raises(BankFormatError):
            load(p)
        assert not marker.exists(), f"{loader} executed the pickle in {name!r}"
    # the payload is live: an unsafe load runs it (open(marker, "w") returns a file object)
    torch.load(paths["bare object"], weights_only=False).close()
    assert marker.exists(), "the test payload did not work, so the test proves nothing"


def test_no_unsafe_deserialisation_in_the_package():
    """Static guard: every torch.load passes weights_only=True; no pickle / marshal / eval /
    numpy allow_pickle anywhere in steerkernel."""
    bad = []
    for path in (ROOT / "steerkernel").rglob("*.py"):
        src = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", src):
            call = src[m.start():src.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                bad.append(f"{path.relative_to(ROOT)}: {call}")
        for pat in (r"\bpickle\.loads?\(", r"\bmarshal\.loads?\(", r"allow_pickle\s*=\s*True",
                    r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"\bdill\.", r"\bcloudpickle\."):
            for m in re.finditer(pat, src):
                bad.append(f"{path.relative_to(ROOT)}: {src[m.start():m.start() + 60]!r}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------ GGUF and vectors
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    from steerkernel.concepts import interop

    path = tmp_path_factory.mktemp("gguf") / "calm.gguf"
    interop.export_gguf(make_bank(), "calm", path)
    return path, path.read_bytes()


def test_gguf_round_trip(gguf_file):
    from steerkernel.concepts import interop

    path, _ = gguf_file
    bank = interop.import_gguf(path)
    assert_valid(bank)
    src = make_bank()
    assert bank.layers == src.layers
    assert torch.allclose(bank.directions[:, 0], src.directions[:, 0], atol=1e-6)


def test_every_single_gguf_flip_and_cut(gguf_file, tmp_path, memory_capped):
    """Exhaustively: every single-bit flip and every truncation of the control vector raises
    BankFormatError or loads as a valid bank (the random test below draws multi-site damage
    from the same contract).  Among them, the flip that turns the model_hint string's value
    type (8) into an array (9): gguf's reader alone then loops over a count of ~2^60 items
    read from the string's bytes and exhausts memory; the header walk refuses it first."""
    from steerkernel.concepts import interop

    _, blob = gguf_file
    hint_type = blob.index(b"controlvector.model_hint") + len(b"controlvector.model_hint")
    assert struct.unpack_from("<I", blob, hint_type)[0] == 8  # STRING
    p = tmp_path / "x.gguf"
    damaged = [blob[:cut] for cut in range(len(blob))]
    for i in range(len(blob)):
        for bit in range(8):
            b = bytearray(blob)
            b[i] ^= 1 << bit
            damaged.append(bytes(b))
    outcomes = {"format error": 0, "valid": 0}
    for bad in damaged:
        p.write_bytes(bad)
        try:
            bank = interop.import_gguf(p)
        except BankFormatError:
            outcomes["format error"] += 1
        else:
            assert_valid(bank)
            outcomes["valid"] += 1
    assert outcomes["format error"] > len(blob)  # every cut at least
    b = bytearray(blob)
    b[hint_type] ^= 1  # STRING -> ARRAY
    p.write_bytes(bytes(b))
    with pytest.raises(BankFormatError, match="past the end of the"):
        interop.import_gguf(p)


@FUZZ(120)
@given(data=st.data())
def test_damaged_gguf_gives_format_error_or_valid_bank(gguf_file, tmp_path, data,
                                                      memory_capped):
    """GGUF has no checksum: a flip in the float data can load as another valid vector, but
    nothing may raise anything other than BankFormatError."""
    from steerkernel.concepts import interop

    _, blob = gguf_file
    mode = data.draw(st.sampled_from(["truncate", "flip", "flip"]), label="mode")
    if mode == "truncate":
        damaged = blob[:data.draw(st.integers(0, len(blob) - 1), label="cut")]
    else:
        b = bytearray(blob)
        b[data.draw(st.integers(0, len(b) - 1), label="byte")] ^= 1 << data.draw(
            st.integers(0, 7), label="bit")
        damaged = bytes(b)
    p = tmp_path / "x.gguf"
    p.write_bytes(damaged)
    try:
        bank = interop.import_gguf(p)
    except BankFormatError:
        pass
    else:
        assert_valid(bank)
    COUNTS["gguf"] += 1


@FUZZ(120)
@given(data=st.data())
def test_damaged_vector_files(tmp_path, data, memory_capped):
    """repeng / steering-vectors style files (.safetensors dict, .pt dict): truncated or
    bit-flipped, they raise BankFormatError or load as a valid bank."""
    from steerkernel.concepts import interop

    kind = data.draw(st.sampled_from([".safetensors", ".pt"]), label="kind")
    src = tmp_path / f"src{kind}"
    vecs = {str(i): torch.randn(8) for i in (2, 3, 5)}
    if kind == ".pt":
        torch.save(vecs, src)
    else:
        from safetensors.torch import save_file

        save_file(vecs, str(src))
    blob = bytearray(src.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="cut")]
    else:
        blob[data.draw(st.integers(0, len(blob) - 1), label="byte")] ^= 1 << data.draw(
            st.integers(0, 7), label="bit")
    p = tmp_path / f"damaged{kind}"
    p.write_bytes(bytes(blob))
    try:
        bank = interop.import_vectors(p)
    except BankFormatError:
        pass
    else:
        assert_valid(bank)
    COUNTS["vector_files"] += 1


def test_absurd_layer_index_in_vector_file(tmp_path):
    """int() of more than 4300 digits raises a plain ValueError; the loader must bound it."""
    from safetensors.torch import save_file

    from steerkernel.concepts import interop

    p = tmp_path / "v.safetensors"
    save_file({"direction." + "9" * 5000: torch.ones(4)}, str(p))
    with pytest.raises(BankFormatError):
        interop.import_vectors(p)


def test_zz_fuzz_counts(capsys):
    """Record how many damaged files were tried (printed to the terminal)."""
    with capsys.disabled():
        print(f"\n[test_bank_fuzz] inputs tried: {sum(COUNTS.values())} "
              f"({', '.join(f'{k}={v}' for k, v in COUNTS.items())})")
    if COUNTS["bit_flips"]:
        assert COUNTS["bit_flips"] >= 300 and COUNTS["truncations"] >= 200
