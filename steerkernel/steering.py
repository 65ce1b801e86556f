"""Declarative steering programs, compiled into the junction op's per-slot tables.

A :class:`Program` is a list of :class:`Steer` entries.  Each entry names a concept of a concept
bank, an operation on that concept's projection ``p = v·h`` (``v`` the unit direction at a layer,
``h`` the residual stream at the output of that decoder layer), the layers and the tokens it
applies to, and an optional gate on another concept's projection.  The junction op edits each
concept's projection through per-slot ``(shift, lo, hi)`` tables (docs/design.md §2, the one
statement of the math), so every operation is a ``(shift, lo, hi)`` triple per (layer, concept):

==============  ===========================  =====  ======  ======
operation       meaning                      shift  lo      hi
==============  ===========================  =====  ======  ======
``add``         ``p += α``                   α      -inf    +inf
``ablate``      ``p = 0``                    0      0       0
``cap_above``   ``p = min(p, τ)`` (ceiling)  0      -inf    τ
``cap_below``   ``p = max(p, τ)`` (floor)    0      τ       +inf
``pin``         ``p = c``                    0      c       c
==============  ===========================  =====  ======  ======

Values carry a unit, resolved per layer ``l`` and concept ``k`` against the bank:
``abs`` (projection units, as is), ``rel`` (× ``bank.resid_norm[l]``, the layer's mean residual
norm: the usual "strength" of the steering literature) and ``z`` (for ``add``: × the concept's
baseline std; for thresholds and pins: ``baseline_mean + value × baseline_std``).  Defaults:
``rel`` for ``add``, ``abs`` otherwise.

Within one entry each layer is named at most once (``calm=+1abs@10+10`` is a
:class:`SpecError`, not a shift of 2).  Separate entries on the same (layer, concept, token
phase) combine on purpose: shifts add up (``calm=+1abs@10; calm=+1abs@10`` shifts by 2),
lower bounds take the max and upper bounds the min (an empty interval is a
:class:`SpecError`).  The update is simultaneous over concepts: exact for orthogonal
directions, approximate for correlated ones (editing one concept moves the projections of the
concepts correlated with it).

A gate makes a slot's whole update conditional on another concept's projection at the same
layer: it opens when ``p[g] > τ`` (``above``) or ``p[g] < τ``; with ``latch`` it stays open for
the rest of the request once it has fired (per layer; decided on the device).  The op has one
gate per slot, so at each layer and token phase all applying entries of a program must share the
same gate (or all be ungated).

Tokens: ``prompt`` means the tokens of a request's first forward (empty KV cache), ``generated``
the tokens of every later forward (one per decode step), ``all`` both.  The first new token is
predicted at the last prompt position, so a ``generated``-only steer starts acting on the second
new token.

This module is framework-free (torch only): :func:`compile_program` turns a program into host
tables, and :class:`SlotTables` owns the fixed-size device buffers the junction reads, updated in
place when a request's program changes (no reallocation, so captured graphs stay valid).

String form (for CLIs), entries separated by ``;`` or ``,``::

    entry   := CONCEPT action ["@" layers] [":" tokens] ["?" gate]
    CONCEPT := NAME | QUOTED              calm   "joy, mild"   "fear (z)"
    action  := "=" NUMBER [unit]          add (default unit rel)   calm=+0.05   calm=4abs
             | "=ablate"                  ablate                   refusal=ablate
             | "=mean"                    pin to the baseline mean fear=mean
             | "<=" NUMBER [unit]         cap above (ceiling)      fear<=2.0    fear<=1.5z
             | ">=" NUMBER [unit]         cap below (floor)        joy>=0
             | "==" NUMBER [unit]         pin                      fear==0.5
    unit    := "abs" | "rel" | "z"
    layers  := RANGE ("+" RANGE)*  with RANGE := INT | INT "-" INT (inclusive)   @10-20+25
               (layer indices below MAX_LAYER = 100,000; at most MAX_STEER_LAYERS = 1024
               layers per entry, each named once: ``@10+10`` and ``@5-9+7`` are errors)
    tokens  := "all" | "prompt" | "generated"
    gate    := CONCEPT (">" | "<") NUMBER [unit] ["!"]       "!" latches the gate
                                                              (default unit abs)

Example: ``"calm=+0.08@10-20:generated?desperate>2z!; refusal=ablate@22-27"`` (one gate per
layer, so the ungated ablation gets layers of its own).

Bounds (checked before the work they bound; docs/security.md): ``MAX_PROGRAM_CHARS``
characters, ``MAX_ENTRIES`` entries, ``MAX_STEER_LAYERS`` layers per entry and
``MAX_PROGRAM_LAYERS`` (entry, layer) pairs per program.  The parser is a one-pass scanner
(no regular expression that can backtrack across parts), so parsing is linear in the length.
Error messages quote at most ``QUOTE_CHARS`` characters of the input (:func:`quote_input`).

Concept names: any non-empty string a bank allows.  A ``NAME`` is written bare when it has no
whitespace and none of ``= < > @ : ? ; , ! " \\``; any other name is a ``QUOTED`` string in
double quotes with ``\\"`` and ``\\\\`` escaping a quote and a backslash (e.g. the concept
``joy, mild`` is written ``"joy, mild"``).  :func:`format_steer` quotes exactly when needed and
writes numbers with ``repr``, so ``parse_steer(format_steer(s)) == s`` for every :class:`Steer`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .errors import SpecError, UnknownConceptError
from .limits import (MAX_LAYER, NAME_RE, NUMBER, NUMBER_RE, QUOTE_CHARS,  # noqa: F401
                     format_name, quote_input, unquote_name)

OPS = ("add", "ablate", "cap_above", "cap_below", "pin")
#: layer indices of a steer must lie in ``[0, MAX_LAYER)`` (no model comes close; bounds what
#: a range such as ``@0-1000000000`` may expand to)
#: bounds of a steering program, checked before the work they bound (docs/security.md)
#: characters of a program's string form (the input string, and the canonical form of a
#: program given as a list)
MAX_PROGRAM_CHARS = 16_384
#: entries per program
MAX_ENTRIES = 256
#: layers one entry names, after ranges are expanded (each layer at most once)
MAX_STEER_LAYERS = 1024
#: (entry, layer) pairs of a whole program, entries without layers counting every bank layer
MAX_PROGRAM_LAYERS = 16_384
#: largest magnitude a resolved value may have: the op's tables are float32
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
UNITS = ("abs", "rel", "z")
TOKENS = ("all", "prompt", "generated")
PHASES = ("prompt", "generated")


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{name} must be a number, got {quote_input(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        raise SpecError(f"{name} must be finite, got an integer of "
                        f"{value.bit_length()} bits") from None
    if not math.isfinite(value):
        raise SpecError(f"{name} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class Gate:
    """Open a steer only while ``p[concept] > threshold`` (``above``) or ``< threshold``.

    ``unit``: ``abs`` (raw projection), ``z`` (``baseline_mean + threshold × baseline_std``) or
    ``rel`` (× the layer's mean residual norm).  ``latch``: once open, stay open for the request.
    """

    concept: str
    threshold: float
    above: bool = True
    unit: str = "abs"
    latch: bool = False

    def __post_init__(self):
        if not isinstance(self.concept, str) or not self.concept:
            raise SpecError(f"gate concept must be a non-empty string, got "
                            f"{quote_input(self.concept)}")
        object.__setattr__(self, "threshold", _finite("gate threshold", self.threshold))
        if self.unit not in UNITS:
            raise SpecError(f"gate unit must be one of {UNITS}, got {quote_input(self.unit)}")
        if not isinstance(self.above, bool) or not isinstance(self.latch, bool):
            raise SpecError("gate above / latch must be booleans")


@dataclass(frozen=True)
class Steer:
    """One intervention on one concept (see the module docstring for the math).

    Args:
        concept: a name in the bank (any non-empty string; the string form quotes names
            that hold grammar characters).
        op: ``add``, ``ablate``, ``cap_above``, ``cap_below`` or ``pin``.
        value: strength (add), threshold (caps) or target (pin); ignored by ``ablate``
            (stored as 0.0, with unit ``abs``).
        unit: ``abs``, ``rel`` or ``z``; None = ``rel`` for add, ``abs`` otherwise.
        layers: decoder-layer indices (must be bank layers); None = every bank layer.
        tokens: ``all``, ``prompt`` or ``generated``.
        gate: optional :class:`Gate`.
    """

    concept: str
    op: str = "add"
    value: float = 0.0
    unit: Optional[str] = None
    layers: Optional[Tuple[int, ...]] = None
    tokens: str = "all"
    gate: Optional[Gate] = None

    def __post_init__(self):
        if not isinstance(self.concept, str) or not self.concept:
            raise SpecError(f"concept must be a non-empty string, got {quote_input(self.concept)}")
        if self.op not in OPS:
            raise SpecError(f"unknown operation {quote_input(self.op)}; choose one of {OPS}")
        object.__setattr__(self, "value", _finite(f"value of {quote_input(self.concept)}",
                                                  self.value))
        unit = self.unit if self.unit is not None else ("rel" if self.op == "add" else "abs")
        if unit not in UNITS:
            raise SpecError(f"unit must be one of {UNITS}, got {quote_input(self.unit)}")
        object.__setattr__(self, "unit", unit)
        if self.op == "ablate":  # value and unit mean nothing here: one canonical form
            object.__setattr__(self, "value", 0.0)
            object.__setattr__(self, "unit", "abs")
        if self.layers is not None:
            if isinstance(self.layers, int):
                layers = (self.layers,)
            elif isinstance(self.layers, (list, tuple, range)):
                layers = self.layers
            else:
                raise SpecError(f"layers must be a list of integers, got "
                                f"{type(self.layers).__name__}")
            if len(layers) > MAX_STEER_LAYERS:  # before looking at any of them
                raise SpecError(f"steer on {quote_input(self.concept)} names {len(layers)} layers "
                                f"(limit {MAX_STEER_LAYERS})")
            layers = tuple(layers)
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise SpecError(f"layers must be integers, got {quote_input(layer)}")
            if not layers:
                raise SpecError(f"steer on {quote_input(self.concept)} has an empty layer list")
            if len(set(layers)) != len(layers):
                seen = set()
                twice = next(x for x in layers if x in seen or seen.add(x))
                raise SpecError(f"layer {twice} is named twice in the steer on "
                                f"{quote_input(self.concept)} (each layer at most once per entry)")
            object.__setattr__(self, "layers", layers)
        if self.tokens not in TOKENS:
            raise SpecError(f"tokens must be one of {TOKENS}, got {quote_input(self.tokens)}")
        if self.gate is not None and not isinstance(self.gate, Gate):
            raise SpecError(f"gate must be a Gate, got {type(self.gate).__name__}")

    def phases(self) -> Tuple[str, ...]:
        return PHASES if self.tokens == "all" else (self.tokens,)


ProgramLike = Union["Program", Steer, str, Sequence[Steer], None]


@dataclass(frozen=True)
class Program:
    """An ordered list of :class:`Steer` entries for one request (empty = no steering)."""

    steers: Tuple[Steer, ...] = ()

    def __post_init__(self):
        steers = tuple(self.steers)
        if len(steers) > MAX_ENTRIES:
            raise SpecError(f"steering program has {len(steers)} entries (limit {MAX_ENTRIES})")
        for s in steers:
            if not isinstance(s, Steer):
                raise SpecError(f"a Program holds Steer entries, got {type(s).__name__}")
        named = sum(len(s.layers) for s in steers if s.layers is not None)
        if named > MAX_PROGRAM_LAYERS:
            raise SpecError(f"steering program names {named} (entry, layer) pairs "
                            f"(limit {MAX_PROGRAM_LAYERS})")
        object.__setattr__(self, "steers", steers)

    @classmethod
    def parse(cls, text: str) -> "Program":
        """Parse the string form (grammar in the module docstring)."""
        return parse_program(text)

    @classmethod
    def coerce(cls, value: ProgramLike) -> "Program":
        """Accept a Program, a Steer, a list of Steers, a string, or None (empty)."""
        if value is None:
            return cls()
        if isinstance(value, Program):
            return value
        if isinstance(value, Steer):
            return cls((value,))
        if isinstance(value, str):
            return parse_program(value)
        if isinstance(value, (list, tuple)):
            return cls(tuple(value))
        raise SpecError(f"cannot make a steering program from {type(value).__name__}")

    def __len__(self) -> int:
        return len(self.steers)

    def __str__(self) -> str:
        return "; ".join(format_steer(s) for s in self.steers)


# ---------------------------------------------------------------------------- string form
_NUM = NUMBER
# the scanner's tokens: each regex is matched once at a position and never backtracked into
# by a later part, so parsing is linear in the entry's length
_WS_RE = re.compile(r"\s*")
_NUM_RE = NUMBER_RE
_UNIT_RE = re.compile(r"abs|rel|z")
_WORD_RE = re.compile(r"ablate|mean")
_LAYERS_RE = re.compile(r"[\d+\-\s]+")
_TOKENS_RE = re.compile(r"\w+")
_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?")


def _parse_layers(text: str, entry: str) -> Tuple[int, ...]:
    """Expand ``"10-20+25"``.  Every index must lie in ``[0, MAX_LAYER)`` (checked on the digit
    strings before any ``int()``), the entry may name at most ``MAX_STEER_LAYERS`` layers
    (checked before each range is expanded) and each layer at most once."""
    out: List[int] = []
    seen = set()
    digits = len(str(MAX_LAYER - 1))
    for part in text.replace(" ", "").split("+"):
        m = _RANGE_RE.fullmatch(part)
        if not m:
            raise SpecError(f"bad layer range {quote_input(part)} in {quote_input(entry)} "
                            "(use e.g. @10-20+25)")
        ends = [g.lstrip("0") or "0" for g in m.groups() if g is not None]
        if any(len(e) > digits or int(e) >= MAX_LAYER for e in ends):
            raise SpecError(f"layer range {quote_input(part)} in {quote_input(entry)} is out of "
                            f"bounds: layer indices lie in [0, {MAX_LAYER})")
        a = int(ends[0])
        b = int(ends[-1])
        if b < a:
            raise SpecError(f"empty layer range {quote_input(part)} in {quote_input(entry)}")
        if len(out) + (b - a + 1) > MAX_STEER_LAYERS:
            raise SpecError(f"too many layers in {quote_input(entry)}: an entry names at most "
                            f"{MAX_STEER_LAYERS} layers")
        for layer in range(a, b + 1):
            if layer in seen:
                raise SpecError(f"layer {layer} is named twice in {quote_input(entry)} (each layer "
                                "at most once per entry; write a second entry to add more)")
            seen.add(layer)
            out.append(layer)
    return tuple(out)


class _Scanner:
    """Left-to-right tokens of one entry (no backtracking: linear time)."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def ws(self) -> None:
        self.pos = _WS_RE.match(self.text, self.pos).end()

    def take(self, rx) -> Optional[str]:
        m = rx.match(self.text, self.pos)
        if m is None or not m.group():
            return None
        self.pos = m.end()
        return m.group()

    def lit(self, *options: str) -> Optional[str]:
        for o in options:
            if self.text.startswith(o, self.pos):
                self.pos += len(o)
                return o
        return None

    @property
    def done(self) -> bool:
        return self.pos == len(self.text)


_EXPECTED = ("expected e.g. 'calm=+0.05', 'refusal=ablate', 'fear<=2.0', 'joy>=0', "
             "'fear==0.5' with optional '@layers', ':tokens' and '?gate' parts")


def _scan_entry(entry: str) -> Tuple[Optional[dict], int]:
    """``(parts, pos)``: the parts of ``entry`` (grammar in the module docstring), or None and
    the position where it stops parsing.  Same language as the single regular expression it
    replaces (whose nested optional whitespace backtracked in O(n^4)), in one pass."""
    s = _Scanner(entry)
    g, ok = _scan_groups(s)
    return (g if ok else None), s.pos


def _scan_groups(s: _Scanner) -> Tuple[dict, bool]:
    """Consume the parts of an entry from ``s``: ``(parts, whether the whole entry parsed)``."""
    g: Dict[str, Optional[str]] = dict.fromkeys(
        ("concept", "cmp", "cval", "cunit", "word", "aval", "aunit", "layers", "tokens",
         "gconcept", "gdir", "gval", "gunit", "latch"))
    g["concept"] = s.take(NAME_RE)
    if g["concept"] is None:
        return g, False
    s.ws()
    g["cmp"] = s.lit("<=", ">=", "==")
    if g["cmp"]:
        s.ws()
        g["cval"] = s.take(_NUM_RE)
        if g["cval"] is None:
            return g, False
        g["cunit"] = s.take(_UNIT_RE)
    elif s.lit("="):
        s.ws()
        g["word"] = s.take(_WORD_RE)
        if g["word"] is None:
            g["aval"] = s.take(_NUM_RE)
            if g["aval"] is None:
                return g, False
            g["aunit"] = s.take(_UNIT_RE)
    else:
        return g, False
    s.ws()
    if s.lit("@"):
        g["layers"] = s.take(_LAYERS_RE)
        if g["layers"] is None:
            return g, False
        s.ws()
    if s.lit(":"):
        g["tokens"] = s.take(_TOKENS_RE)
        if g["tokens"] is None:
            return g, False
        s.ws()
    if s.lit("?"):
        s.ws()
        g["gconcept"] = s.take(NAME_RE)
        if g["gconcept"] is None:
            return g, False
        s.ws()
        g["gdir"] = s.lit(">", "<")
        if g["gdir"] is None:
            return g, False
        s.ws()
        g["gval"] = s.take(_NUM_RE)
        if g["gval"] is None:
            return g, False
        g["gunit"] = s.take(_UNIT_RE)
        s.ws()
        g["latch"] = s.lit("!")
        s.ws()
    return g, s.done


def parse_steer(text: str) -> Steer:
    """Parse one entry of the string form, e.g. ``"fear<=2.0@10-20"`` (linear time)."""
    if not isinstance(text, str):
        raise SpecError(f"a steering entry must be str, got {type(text).__name__}")
    if len(text) > MAX_PROGRAM_CHARS:
        raise SpecError(f"steering entry is {len(text)} characters long "
                        f"(limit {MAX_PROGRAM_CHARS})")
    entry = text.strip()
    g, pos = _scan_entry(entry)
    if g is None:
        raise SpecError(f"cannot parse steering entry {quote_input(entry)} at character {pos + 1}; "
                        f"{_EXPECTED}")
    if g["cmp"]:
        op = {"<=": "cap_above", ">=": "cap_below", "==": "pin"}[g["cmp"]]
        value, unit = float(g["cval"]), g["cunit"]
    elif g["word"] == "ablate":
        op, value, unit = "ablate", 0.0, None
    elif g["word"] == "mean":
        op, value, unit = "pin", 0.0, "z"
    else:
        op, value, unit = "add", float(g["aval"]), g["aunit"]
    layers = _parse_layers(g["layers"], entry) if g["layers"] else None
    tokens = g["tokens"] or "all"
    if tokens not in TOKENS:
        raise SpecError(f"bad tokens {quote_input(tokens)} in {quote_input(entry)}; choose one "
                        f"of {TOKENS}")
    gate = None
    if g["gconcept"]:
        gate = Gate(unquote_name(g["gconcept"]), float(g["gval"]), above=g["gdir"] == ">",
                    unit=g["gunit"] or "abs", latch=bool(g["latch"]))
    return Steer(unquote_name(g["concept"]), op, value, unit, layers, tokens, gate)


def _split_entries(text: str) -> List[str]:
    """Split at ``;`` / ``,`` outside double-quoted names (one linear pass)."""
    if '"' not in text:
        return re.split(r"[;,]", text)
    parts, start, quoted, escaped = [], 0, False, False
    for i, c in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in ";,":
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_program(text: str) -> Program:
    """Parse ``"calm=+0.05; refusal=ablate"`` (``;`` or ``,`` between entries; quoted concept
    names may contain them).  Linear time; the bounds (``MAX_PROGRAM_CHARS``, ``MAX_ENTRIES``,
    ``MAX_STEER_LAYERS``, ``MAX_PROGRAM_LAYERS``) are checked before the work they bound."""
    if not isinstance(text, str):
        raise SpecError(f"a steering string must be str, got {type(text).__name__}")
    if len(text) > MAX_PROGRAM_CHARS:
        raise SpecError(f"steering program is {len(text)} characters long "
                        f"(limit {MAX_PROGRAM_CHARS})")
    parts = [p for p in _split_entries(text) if p.strip()]
    if len(parts) > MAX_ENTRIES:
        raise SpecError(f"steering program has {len(parts)} entries (limit {MAX_ENTRIES})")
    return Program(tuple(parse_steer(p) for p in parts))


def _format_layers(layers: Tuple[int, ...]) -> str:
    """``(2, 3, 4, 5, 7)`` -> ``"2-5+7"``: ascending runs of three or more as ranges (order
    kept, so the layers parse back to the same tuple)."""
    out, i, n = [], 0, len(layers)
    while i < n:
        j = i
        while j + 1 < n and layers[j + 1] == layers[j] + 1:
            j += 1
        if j - i >= 2:
            out.append(f"{layers[i]}-{layers[j]}")
        else:
            out.extend(str(x) for x in layers[i:j + 1])
        i = j + 1
    return "+".join(out)


def format_steer(s: Steer) -> str:
    """The string form of one entry: ``parse_steer(format_steer(s)) == s`` exactly (numbers
    are written with ``repr``, names are quoted when they hold grammar characters)."""
    if s.op == "ablate":
        body = "=ablate"
    else:
        sym = {"add": "=", "cap_above": "<=", "cap_below": ">=", "pin": "=="}[s.op]
        body = f"{sym}{s.value:+}{s.unit}"
    if s.layers is not None:
        body += "@" + _format_layers(s.layers)
    if s.tokens != "all":
        body += ":" + s.tokens
    if s.gate is not None:
        g = s.gate
        body += f"?{format_name(g.concept)}{'>' if g.above else '<'}{g.threshold!r}{g.unit}"
        body += "!" if g.latch else ""
    return format_name(s.concept) + body


# ---------------------------------------------------------------------------- compilation
@dataclass
class PhaseTables:
    """Host tables of one program for one token phase, over the bank's ``L`` layers.

    ``shift``/``lo``/``hi`` fp32 ``[L, K]``; ``gate_concept`` int32 ``[L]`` (-1 ungated);
    ``gate_threshold`` fp32 ``[L]``; ``gate_above`` bool ``[L]``; ``latch`` bool ``[L]``
    (the gate at that layer latches); ``active`` bool ``[L]`` (some entry applies there).
    """

    shift: Tensor
    lo: Tensor
    hi: Tensor
    gate_concept: Tensor
    gate_threshold: Tensor
    gate_above: Tensor
    latch: Tensor
    active: Tensor

    @classmethod
    def identity(cls, L: int, K: int) -> "PhaseTables":
        return cls(torch.zeros(L, K), torch.full((L, K), -math.inf),
                   torch.full((L, K), math.inf), torch.full((L,), -1, dtype=torch.int32),
                   torch.zeros(L), torch.ones(L, dtype=torch.bool),
                   torch.zeros(L, dtype=torch.bool), torch.zeros(L, dtype=torch.bool))

    @property
    def is_identity(self) -> bool:
        return not bool(self.active.any())

    def same_as(self, other: "PhaseTables") -> bool:
        return all(torch.equal(getattr(self, f), getattr(other, f))
                   for f in ("shift", "lo", "hi", "gate_concept", "gate_threshold",
                             "gate_above", "latch", "active"))


@dataclass
class CompiledProgram:
    """A program resolved against one bank: ``tables[phase]`` for ``prompt`` / ``generated``.

    ``gated``: some entry has a gate; ``latched``: some gate latches; ``identity[phase]``: no
    entry applies in that phase; ``phase_dependent``: the two phases' tables differ.
    """

    program: Program
    tables: Dict[str, PhaseTables]
    gated: bool
    latched: bool = field(init=False)
    identity: Dict[str, bool] = field(init=False)
    phase_dependent: bool = field(init=False)

    def __post_init__(self):
        self.latched = any(bool(t.latch.any()) for t in self.tables.values())
        self.identity = {ph: t.is_identity for ph, t in self.tables.items()}
        self.phase_dependent = not self.tables["prompt"].same_as(self.tables["generated"])


def _concept_index(bank, name: str, what: str) -> int:
    names = list(bank.names)
    if name not in names:
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise UnknownConceptError(f"{what} {quote_input(name)} is not in the bank (concepts: "
                                  f"{shown})")
    return names.index(name)


def _resolve(value: float, unit: str, as_shift: bool, i: int, k: int, bank) -> float:
    """Turn ``value`` in ``unit`` into projection units at bank layer position ``i``."""
    if unit == "abs":
        out = value
    elif unit == "rel":
        out = value * float(bank.resid_norm[i])
    else:
        std = float(bank.baseline_std[i, k])
        if not math.isfinite(std) or std <= 0:
            raise SpecError(f"z units need a positive baseline std, but concept "
                            f"{bank.names[k]!r} has std {std} at layer {bank.layers[i]}")
        out = value * std if as_shift else float(bank.baseline_mean[i, k]) + value * std
    if not math.isfinite(out):
        raise SpecError(f"value {value} {unit} resolves to {out} at layer {bank.layers[i]} "
                        "(check the bank's statistics)")
    if abs(out) > FLOAT32_MAX:
        raise SpecError(f"value {value!r} {unit} of concept {bank.names[k]!r} resolves to "
                        f"{out!r} at layer {bank.layers[i]}, which overflows float32 (the op's "
                        f"tables hold |x| <= {FLOAT32_MAX:.8g}; it would be non-finite)")
    return out


def compile_program(program: ProgramLike, bank) -> CompiledProgram:
    """Resolve ``program`` against ``bank`` into per-phase tables over the bank's layers.

    Raises :class:`UnknownConceptError` for a concept not in the bank and :class:`SpecError`
    for layers the bank does not cover, gate conflicts or empty bound intervals.
    """
    program = Program.coerce(program)
    layers = [int(x) for x in bank.layers]
    pos = {layer: i for i, layer in enumerate(layers)}
    L, K = len(layers), len(bank.names)
    pairs = sum(L if s.layers is None else len(s.layers) for s in program.steers)
    if pairs > MAX_PROGRAM_LAYERS:  # before any table is written
        raise SpecError(f"steering program applies to {pairs} (entry, layer) pairs on this "
                        f"bank (limit {MAX_PROGRAM_LAYERS})")
    tables = {ph: PhaseTables.identity(L, K) for ph in PHASES}
    gates: Dict[Tuple[str, int], Optional[Gate]] = {}
    for s in program.steers:
        k = _concept_index(bank, s.concept, "concept")
        if s.layers is None:
            idx = list(range(L))
        else:
            idx = []
            for layer in s.layers:
                if layer not in pos:
                    raise SpecError(f"layer {layer} of the steer on {quote_input(s.concept)} is "
                                    f"out of range: the bank covers layers {layers}")
                idx.append(pos[layer])
        g_k = _concept_index(bank, s.gate.concept, "gate concept") if s.gate else -1
        for ph in s.phases():
            t = tables[ph]
            for i in idx:
                key = (ph, i)
                if key in gates and gates[key] != s.gate:
                    raise SpecError(
                        f"conflicting gates at layer {layers[i]} ({ph} tokens): the op has one "
                        "gate per request, so all steers applying at a layer must share it")
                gates[key] = s.gate
                if s.op == "add":
                    t.shift[i, k] += _resolve(s.value, s.unit, True, i, k, bank)
                elif s.op == "ablate":
                    lo, hi = 0.0, 0.0
                else:
                    v = _resolve(s.value, s.unit, False, i, k, bank)
                    lo, hi = {"cap_above": (-math.inf, v), "cap_below": (v, math.inf),
                              "pin": (v, v)}[s.op]
                if s.op != "add":
                    t.lo[i, k] = max(float(t.lo[i, k]), lo)
                    t.hi[i, k] = min(float(t.hi[i, k]), hi)
                    if t.lo[i, k] > t.hi[i, k]:
                        raise SpecError(f"steers on {quote_input(s.concept)} at layer "
                                        f"{layers[i]} ({ph} tokens) leave an empty interval "
                                        f"[{float(t.lo[i, k])}, {float(t.hi[i, k])}]")
                t.active[i] = True
                if s.gate is not None:
                    t.gate_concept[i] = g_k
                    t.gate_threshold[i] = _resolve(s.gate.threshold, s.gate.unit, False, i,
                                                   g_k, bank)
                    t.gate_above[i] = s.gate.above
                    t.latch[i] = s.gate.latch
    for t in tables.values():
        if not torch.isfinite(t.shift).all():
            raise SpecError("steering strengths add up to a non-finite shift")
    gated = any(g is not None for g in gates.values())
    return CompiledProgram(program, tables, gated)


# ---------------------------------------------------------------------------- device tables
class SlotTables:
    """Fixed-size device tables the junction op reads, one row per slot, one plane per layer.

    ``shift``/``lo``/``hi`` fp32 ``[L, P, K]``; ``gate_concept`` int32, ``gate_threshold`` fp32,
    ``gate_above`` bool, ``latch`` int32 and ``latch_keep`` int32 ``[L, P]``.  Slot 0 is the
    identity and is never written.  Everything is allocated once here; :meth:`assign` and
    :meth:`clear` write rows in place, so views handed to the op (``layer_args``) stay valid.
    """

    def __init__(self, num_layers: int, num_slots: int, K: int, device="cpu"):
        if num_slots < 2:
            raise SpecError(f"need at least 2 slots (slot 0 is the identity), got {num_slots}")
        L, P = int(num_layers), int(num_slots)
        dev = torch.device(device)
        self.L, self.P, self.K, self.device = L, P, int(K), dev
        self.shift = torch.zeros(L, P, K, device=dev)
        self.lo = torch.full((L, P, K), -math.inf, device=dev)
        self.hi = torch.full((L, P, K), math.inf, device=dev)
        self.gate_concept = torch.full((L, P), -1, dtype=torch.int32, device=dev)
        self.gate_threshold = torch.zeros(L, P, device=dev)
        self.gate_above = torch.ones(L, P, dtype=torch.bool, device=dev)
        self.latch = torch.zeros(L, P, dtype=torch.int32, device=dev)
        self.latch_keep = torch.zeros(L, P, dtype=torch.int32, device=dev)
        self._held: Dict[int, Tuple[CompiledProgram, str]] = {}
        self._layer_args = [(self.shift[i], self.lo[i], self.hi[i], self.gate_concept[i],
                             self.gate_threshold[i], self.gate_above[i], self.latch[i])
                            for i in range(L)]

    def layer_args(self, i: int):
        """``(shift, lo, hi, gate_concept, gate_threshold, gate_above, latch)`` at layer ``i``
        (contiguous views: ``[P, K]`` ×3 and ``[P]`` ×4)."""
        return self._layer_args[i]

    def _check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 1 <= slot < self.P:
            raise SpecError(f"slot must be an int in [1, {self.P}), got {slot!r}")
        return slot

    def assign(self, slot: int, compiled: CompiledProgram, phase: str) -> None:
        """Write ``compiled``'s ``phase`` tables into ``slot`` and reset its latch."""
        slot = self._check_slot(slot)
        if phase not in PHASES:
            raise SpecError(f"phase must be one of {PHASES}, got {phase!r}")
        t = compiled.tables[phase]
        if t.shift.shape != (self.L, self.K):
            raise SpecError(f"program tables are {tuple(t.shift.shape)} but the slot tables "
                            f"hold [L={self.L}, K={self.K}]")
        nb = self.device.type == "cuda"
        self.shift[:, slot].copy_(t.shift, non_blocking=nb)
        self.lo[:, slot].copy_(t.lo, non_blocking=nb)
        self.hi[:, slot].copy_(t.hi, non_blocking=nb)
        self.gate_concept[:, slot].copy_(t.gate_concept, non_blocking=nb)
        self.gate_threshold[:, slot].copy_(t.gate_threshold, non_blocking=nb)
        self.gate_above[:, slot].copy_(t.gate_above, non_blocking=nb)
        self.latch_keep[:, slot].copy_(t.latch.to(torch.int32), non_blocking=nb)
        self.latch[:, slot].zero_()
        self._held[slot] = (compiled, phase)

    def set_phase(self, slot: int, phase: str) -> None:
        """Switch ``slot`` to the other token phase of its program; keeps the latch."""
        compiled, held = self._held[slot]
        if held == phase:
            return
        if not compiled.phase_dependent:
            self._held[slot] = (compiled, phase)
            return
        latch = self.latch[:, slot].clone()
        self.assign(slot, compiled, phase)
        self.latch[:, slot].copy_(latch)

    def clear(self, slot: int) -> None:
        """Make ``slot`` the identity again."""
        slot = self._check_slot(slot)
        self.shift[:, slot].zero_()
        self.lo[:, slot].fill_(-math.inf)
        self.hi[:, slot].fill_(math.inf)
        self.gate_concept[:, slot].fill_(-1)
        self.gate_threshold[:, slot].zero_()
        self.gate_above[:, slot].fill_(True)
        self.latch[:, slot].zero_()
        self.latch_keep[:, slot].zero_()
        self._held.pop(slot, None)

    def held(self, slot: int) -> Optional[Tuple[CompiledProgram, str]]:
        return self._held.get(slot)

    def reset_latches(self) -> None:
        """Forget every latched gate (a new set of requests starts)."""
        self.latch.zero_()

    def begin_forward(self) -> None:
        """Before each forward: drop latch bits of gates that do not latch."""
        self.latch.mul_(self.latch_keep)
