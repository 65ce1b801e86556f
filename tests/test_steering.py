"""Steering programs: parsing, compilation into (shift, lo, hi, gate) tables, slot tables."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steerkernel.errors import SpecError, UnknownConceptError
from steerkernel.steering import (Gate, Program, SlotTables, Steer, compile_program,
                                  format_steer, parse_program, parse_steer)
from steerkernel.ops import junction

from hf_helpers import ConceptBank

INF = math.inf


def make_bank(K=4, layers=(2, 5, 7), d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = len(layers)
    q = torch.linalg.qr(torch.randn(L, d, K, generator=g)).Q.transpose(1, 2).contiguous()
    return ConceptBank(
        names=["calm", "fear", "joy", "refusal"][:K], layers=list(layers), directions=q,
        baseline_mean=torch.arange(L * K, dtype=torch.float32).view(L, K) / 10,
        baseline_std=torch.full((L, K), 2.0), vector_norms=torch.ones(L, K),
        resid_norm=torch.tensor([10.0, 20.0, 40.0][:L]), default_layer=layers[L // 2],
        site="resid_post", metadata={}, fingerprint={})


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text,expect", [
    ("calm=+0.05", Steer("calm", "add", 0.05, "rel")),
    ("calm=4abs", Steer("calm", "add", 4.0, "abs")),
    ("calm=-1.5z", Steer("calm", "add", -1.5, "z")),
    ("refusal=ablate", Steer("refusal", "ablate")),
    ("fear<=2.0", Steer("fear", "cap_above", 2.0, "abs")),
    ("fear<=1.5z", Steer("fear", "cap_above", 1.5, "z")),
    ("joy>=0", Steer("joy", "cap_below", 0.0, "abs")),
    ("fear==0.5", Steer("fear", "pin", 0.5, "abs")),
    ("fear=mean", Steer("fear", "pin", 0.0, "z")),
    ("calm=+0.1@2-5+7", Steer("calm", "add", 0.1, "rel", (2, 3, 4, 5, 7))),
    ("calm=+0.1:generated", Steer("calm", "add", 0.1, tokens="generated")),
    ("calm=+0.1?fear>2z!", Steer("calm", "add", 0.1, gate=Gate("fear", 2.0, True, "z", True))),
    ("calm = +0.1 @5 :prompt ? fear<-1", Steer("calm", "add", 0.1, "rel", (5,), "prompt",
                                              Gate("fear", -1.0, False, "abs", False))),
])
def test_parse_entries(text, expect):
    assert parse_steer(text) == expect
    assert parse_steer(format_steer(expect)) == expect  # round trip


def test_parse_program_separators():
    p = parse_program("calm=+0.05; refusal=ablate, fear<=2")
    assert [s.concept for s in p.steers] == ["calm", "refusal", "fear"]
    assert Program.coerce("calm=+1") == Program((Steer("calm", "add", 1.0),))
    assert len(Program.coerce(None)) == 0


@pytest.mark.parametrize("bad", ["calm", "calm=", "calm=+x", "calm=+1@", "calm=+1@5-2",
                                 "calm=+1:sometimes", "calm=+1?fear", "calm=+1kg",
                                 "calm=nan", "calm=inf", "=+1", "calm<2"])
def test_parse_errors(bad):
    with pytest.raises(SpecError):
        parse_program(bad)


@pytest.mark.parametrize("kwargs", [
    dict(value=float("nan")), dict(value=float("inf")), dict(op="scale"), dict(unit="pct"),
    dict(tokens="future"), dict(layers=()), dict(layers=(1.5,)), dict(value="3"),
])
def test_steer_validation(kwargs):
    with pytest.raises(SpecError):
        Steer("calm", **kwargs)
    with pytest.raises(SpecError):
        Gate("fear", float("nan"))


# ------------------------------------------------------------------------------ string form
@pytest.mark.parametrize("name,written", [
    ("calm", "calm"), ("a-b+c", "a-b+c"), ("é", "é"),
    ("joy, mild", '"joy, mild"'), ("fear; dread", '"fear; dread"'), ("a b", '"a b"'),
    (" lead", '" lead"'), ('say "hi"', '"say \\"hi\\""'), ("back\\slash", '"back\\\\slash"'),
    ("x=y<z>w@v:u?t!s", '"x=y<z>w@v:u?t!s"'), ("tab\tnl\n", '"tab\tnl\n"'), ('"', '"\\""'),
])
def test_concept_names_with_grammar_characters_are_quoted(name, written):
    """Names a bank allows but the bare grammar cannot hold are written in double quotes
    (``\\"`` and ``\\\\`` escaped) and parse back to the same name, gate concepts too."""
    s = Steer(name, "add", 0.5, layers=(2,), gate=Gate(name, -1.0, latch=True))
    text = format_steer(s)
    assert text.startswith(written) and f"?{written}>" in text
    assert parse_steer(text) == s
    assert parse_program(f"{text}; {text}, {text}") == Program((s, s, s))


def test_quoted_names_compile_against_a_bank():
    bank = make_bank()
    bank.names[1] = "fear, dread"
    c = compile_program('"fear, dread"<=1.5@2; calm=+1@5?"fear, dread">0', bank)
    assert float(c.tables["prompt"].hi[0, 1]) == 1.5
    assert c.tables["prompt"].gate_concept.tolist() == [-1, 1, -1]
    with pytest.raises(UnknownConceptError, match="fear"):
        compile_program("fear<=1.5", bank)  # the bare prefix is another (unknown) name


@pytest.mark.parametrize("bad", ['"calm=+1', '"calm"x=+1', '""=+1', 'calm=+1?"fear>0',
                                 '"a\\"=+1', 'ca"lm=+1', '"a";b"=+1'])
def test_bad_quoting_is_a_spec_error(bad):
    with pytest.raises(SpecError):
        parse_program(bad)


def test_unterminated_quote_splits_in_linear_time():
    import time

    t = time.perf_counter()
    with pytest.raises(SpecError):
        parse_program('"\\"' * 20000 + "; calm=+1")
    assert time.perf_counter() - t < 5.0


def test_ablate_is_canonical():
    """ablate ignores value and unit: they are stored as 0.0 abs, so equal steers compare
    equal and round-trip."""
    s = Steer("calm", "ablate", 3.0, "z")
    assert (s.value, s.unit) == (0.0, "abs") and s == Steer("calm", "ablate")
    assert parse_steer(format_steer(s)) == s


NAME_TEXT = st.text(min_size=1, max_size=12)
FINITE = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def steers(draw):
    gate = None
    if draw(st.booleans()):
        gate = Gate(draw(NAME_TEXT), draw(FINITE), draw(st.booleans()),
                    draw(st.sampled_from(["abs", "rel", "z"])), draw(st.booleans()))
    layers = draw(st.none() | st.lists(st.integers(0, 99_999), min_size=1, max_size=5,
                                       unique=True).map(tuple))
    return Steer(draw(NAME_TEXT), draw(st.sampled_from(["add", "ablate", "cap_above",
                                                        "cap_below", "pin"])),
                 draw(FINITE), draw(st.sampled_from([None, "abs", "rel", "z"])), layers,
                 draw(st.sampled_from(["all", "prompt", "generated"])), gate)


@settings(max_examples=300, deadline=None)
@given(steer=steers(), more=st.lists(steers(), max_size=3))
def test_format_parse_round_trip_property(steer, more):
    """Every Steer (any name, any finite value, any layers < MAX_LAYER) survives
    format_steer -> parse_steer exactly, and a Program survives str -> parse_program."""
    assert parse_steer(format_steer(steer)) == steer
    program = Program((steer, *more))
    assert parse_program(str(program)) == program


# ------------------------------------------------------------------------------ compilation
def test_compile_tables_per_operation():
    bank = make_bank()
    c = compile_program("calm=+0.5; fear<=3; joy>=-1; refusal=ablate", bank)
    for ph in ("prompt", "generated"):
        t = c.tables[ph]
        # add is relative to each layer's mean residual norm
        assert torch.allclose(t.shift[:, 0], 0.5 * bank.resid_norm)
        assert (t.shift[:, 1:] == 0).all()
        assert t.lo[:, 0].eq(-INF).all() and t.hi[:, 0].eq(INF).all()
        assert t.lo[:, 1].eq(-INF).all() and t.hi[:, 1].eq(3.0).all()
        assert t.lo[:, 2].eq(-1.0).all() and t.hi[:, 2].eq(INF).all()
        assert t.lo[:, 3].eq(0.0).all() and t.hi[:, 3].eq(0.0).all()
        assert (t.gate_concept == -1).all() and t.active.all()
    assert not c.gated and not c.phase_dependent and not c.identity["prompt"]


def test_compile_units_layers_and_phases():
    bank = make_bank()
    c = compile_program([Steer("fear", "pin", 1.0, "z", layers=(5,), tokens="generated"),
                         Steer("calm", "add", 2.0, "z", layers=(2,), tokens="prompt")], bank)
    tg, tp = c.tables["generated"], c.tables["prompt"]
    i5, i2 = 1, 0
    pin = float(bank.baseline_mean[i5, 1] + 1.0 * bank.baseline_std[i5, 1])
    assert tg.lo[i5, 1] == pin and tg.hi[i5, 1] == pin
    assert tg.active.tolist() == [False, True, False]
    assert tp.shift[i2, 0] == 2.0 * 2.0 and tp.active.tolist() == [True, False, False]
    assert tp.lo[i5, 1] == -INF  # the pin is generated-only
    assert c.phase_dependent


def test_compile_combines_entries_on_one_concept():
    bank = make_bank()
    c = compile_program("calm=1abs; calm=2abs; calm<=5; calm<=4; calm>=-3", bank)
    t = c.tables["prompt"]
    assert (t.shift[:, 0] == 3.0).all() and (t.hi[:, 0] == 4.0).all() and (t.lo[:, 0] == -3).all()
    with pytest.raises(SpecError, match="empty interval"):
        compile_program("calm<=1; calm>=2", bank)


def test_compile_gates():
    bank = make_bank()
    c = compile_program("calm=+0.1@5?fear>1.5z!", bank)
    t = c.tables["prompt"]
    assert t.gate_concept.tolist() == [-1, 1, -1]
    assert t.gate_threshold[1] == pytest.approx(float(bank.baseline_mean[1, 1]) + 1.5 * 2.0)
    assert t.gate_above[1] and t.latch.tolist() == [False, True, False]
    assert c.gated and c.latched
    with pytest.raises(SpecError, match="conflicting gates"):
        compile_program("calm=+0.1?fear>1; joy=+0.1?fear>2", bank)
    with pytest.raises(SpecError, match="conflicting gates"):
        compile_program("calm=+0.1?fear>1; joy=+0.1", bank)
    # different layers may carry different gates
    compile_program("calm=+0.1@2?fear>1; joy=+0.1@5?fear<2", bank)


def test_compile_errors():
    bank = make_bank()
    with pytest.raises(UnknownConceptError, match="anger"):
        compile_program("anger=+1", bank)
    with pytest.raises(UnknownConceptError, match="gate concept 'anger'"):
        compile_program("calm=+1?anger>2", bank)
    with pytest.raises(SpecError, match="layer 3 .* out of range"):
        compile_program("calm=+1@3", bank)
    with pytest.raises(SpecError, match="layer 99"):
        compile_program("calm=+1@99", bank)
    bank.baseline_std[0, 0] = 0.0
    with pytest.raises(SpecError, match="positive baseline std"):
        compile_program("calm=+1z", bank)
    with pytest.raises(SpecError):
        compile_program(42, bank)


# ------------------------------------------------------------------------------ slot tables
def test_slot_tables_in_place_and_identity():
    bank = make_bank()
    tables = SlotTables(3, 5, 4)
    ptrs = [t.data_ptr() for t in (tables.shift, tables.lo, tables.hi, tables.gate_concept,
                                   tables.latch)]
    view = tables.layer_args(1)[0]
    a = compile_program("calm=+0.5", bank)
    b = compile_program("fear<=1?joy>0!", bank)
    tables.assign(2, a, "prompt")
    tables.assign(3, b, "prompt")
    assert torch.equal(view[2], a.tables["prompt"].shift[1])
    assert tables.hi[1, 3, 1] == 1.0 and tables.gate_concept[1, 3] == 2
    assert tables.latch_keep[:, 3].tolist() == [1, 1, 1]
    tables.clear(2)
    tables.assign(3, a, "prompt")  # a request's program changes: rows rewritten in place
    assert [t.data_ptr() for t in (tables.shift, tables.lo, tables.hi, tables.gate_concept,
                                   tables.latch)] == ptrs
    assert (tables.shift[:, 0] == 0).all() and (tables.lo[:, 0] == -INF).all()  # slot 0 identity
    assert (tables.shift[:, 2] == 0).all() and (tables.gate_concept[:, 3] == -1).all()
    with pytest.raises(SpecError):
        tables.assign(0, a, "prompt")
    with pytest.raises(SpecError):
        tables.assign(5, a, "prompt")


def test_slot_tables_latch_and_phase():
    bank = make_bank()
    tables = SlotTables(3, 3, 4)
    gated = compile_program("calm=+1:generated?fear>0!; calm=+2:prompt?fear>0!", bank)
    plain = compile_program("calm=+1?fear>0", bank)
    tables.assign(1, gated, "prompt")
    tables.assign(2, plain, "prompt")
    tables.latch.fill_(1)
    tables.set_phase(1, "generated")  # keeps the latch, swaps the tables
    assert tables.latch[:, 1].tolist() == [1, 1, 1]
    assert (tables.shift[:, 1, 0] == bank.resid_norm).all()
    tables.begin_forward()  # the unlatched gate forgets, the latched one keeps
    assert tables.latch[:, 1].tolist() == [1, 1, 1] and tables.latch[:, 2].tolist() == [0, 0, 0]
    tables.reset_latches()
    assert (tables.latch == 0).all()


def test_tables_drive_the_op_like_the_spec():
    """One junction call with compiled tables does exactly what each operation promises."""
    bank = make_bank(K=4, layers=(0,), d=16)
    # float64 orthonormal rows end to end: the identities then hold to 1e-9
    V = torch.linalg.qr(bank.directions[0].double().T).Q.T.contiguous()
    h = torch.randn(4, 16, dtype=torch.float64) * 3
    p = h @ V.T
    tables = SlotTables(1, 5, 4)
    progs = ["calm=+2abs", "fear<=-10", "joy>=10", "refusal=ablate"]
    for s, text in enumerate(progs, start=1):
        tables.assign(s, compile_program(text, bank), "prompt")
    slot = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    res = h.clone()
    shift, lo, hi, *_ = tables.layer_args(0)
    junction(res, V, slot=slot, shift=shift, lo=lo, hi=hi, backend="reference")
    q = res @ V.T
    assert float(q[0, 0]) == pytest.approx(float(p[0, 0]) + 2, abs=1e-9)
    assert float(q[1, 1]) == pytest.approx(-10, abs=1e-9)
    assert float(q[2, 2]) == pytest.approx(10, abs=1e-9)
    assert float(q[3, 3]) == pytest.approx(0, abs=1e-9)
    # the other (orthogonal) concepts are untouched
    assert torch.allclose(q[0, 1:], p[0, 1:]) and torch.allclose(q[3, :3], p[3, :3])
