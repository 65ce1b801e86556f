"""Alarm rules with hysteresis, evaluated on the device.

A rule watches one concept at one layer, on z-scores (default) or raw projections::

    "desperate z > 2 for 8"                 fire after 8 consecutive tokens with z > 2
    "calm z < -1.5 for 4 release -0.5"      fire after 4 tokens below -1.5; re-arm only once
                                             the value is back at or above -0.5
    "afraid@20 > 3.0"                        raw projection at layer 20, one token suffices
    "sad>2"                                  the compact form of gates works too (raw; the
                                             ``z`` marker needs a space: "sad z>2")

Semantics per (request, rule), token by token:
``run`` counts consecutive tokens meeting the condition; the alarm *fires* (one event) when
``run`` reaches ``consecutive`` while not active, and becomes active.  While active it *clears*
after ``release_after`` consecutive tokens at or beyond ``release`` (default: the threshold
itself), and can then fire again.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import SpecError
from ..limits import MAX_LAYER, NAME_RE, NUMBER_RE as _NUM_RE, format_name, quote_input, \
    unquote_name

#: characters of an alarm rule's string form
MAX_RULE_CHARS = 1024
_DIGITS_RE = re.compile(r"\d+")
_WS_RE = re.compile(r"\s*")
_SPACE_RE = re.compile(r"\s+")
_COUNT_DIGITS = 7  # consecutive <= 1e6: a longer digit string is refused before int()
_LAYER_DIGITS = len(str(MAX_LAYER - 1))


def _scan_rule(text: str) -> Tuple[Optional[dict], int]:
    """``(parts, pos)`` of ``concept[@layer] [z] >|< threshold [for N] [release R]``, or
    None and the position where it stops parsing.  One left-to-right pass (each token regex
    is matched once at a position, never backtracked into): linear time."""
    pos = 0
    g: Dict[str, Optional[str]] = dict.fromkeys(("concept", "layer", "z", "op", "thr", "n",
                                                   "rel"))

    def take(rx) -> Optional[str]:
        nonlocal pos
        m = rx.match(text, pos)
        if m is None or not m.group():
            return None
        pos = m.end()
        return m.group()

    def ws() -> bool:
        nonlocal pos
        start, pos = pos, _WS_RE.match(text, pos).end()
        return pos > start

    ws()
    g["concept"] = take(NAME_RE)  # the steering grammar's names, quoted ones too
    if g["concept"] is None:
        return None, pos
    if text.startswith("@", pos):
        pos += 1
        g["layer"] = take(_DIGITS_RE)
        if g["layer"] is None:
            return None, pos
    spaced = ws()
    if spaced and text.startswith("z", pos):  # "calm z > 2"; "calmz" is a concept name
        pos += 1
        g["z"] = "z"
        ws()
    if pos < len(text) and text[pos] in "<>":
        g["op"] = text[pos]
        pos += 1
    else:
        return None, pos
    ws()
    g["thr"] = take(_NUM_RE)
    if g["thr"] is None:
        return None, pos
    for word, key, rx in (("for", "n", _DIGITS_RE), ("release", "rel", _NUM_RE)):
        m = _SPACE_RE.match(text, pos)
        if m is not None and text.startswith(word, m.end()):
            after = _SPACE_RE.match(text, m.end() + len(word))
            if after is None:
                return None, m.end() + len(word)
            pos = after.end()
            g[key] = take(rx)
            if g[key] is None:
                return None, pos
    ws()
    return (g if pos == len(text) else None), pos


@dataclass(frozen=True)
class AlarmRule:
    """One alarm rule (see the module docstring for the string form)."""

    concept: str
    threshold: float
    above: bool = True
    zscore: bool = True
    consecutive: int = 1
    release: Optional[float] = None
    release_after: int = 1
    layer: Optional[int] = None  # None: the bank's default layer
    name: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.concept, str) or not self.concept:
            raise SpecError("alarm rule needs a concept name")
        for field in ("threshold", "release"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise SpecError(f"alarm rule {field} must be a finite number, got {v!r}")
        for field in ("consecutive", "release_after"):
            v = getattr(self, field)
            if not isinstance(v, int) or v < 1 or v > 1_000_000:
                raise SpecError(f"alarm rule {field} must be an integer in [1, 1e6], got {v!r}")
        if self.release is not None and (self.release > self.threshold if self.above
                                         else self.release < self.threshold):
            raise SpecError("alarm release level must lie on the quiet side of the threshold")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        at = f"@{self.layer}" if self.layer is not None else ""
        z = "z " if self.zscore else ""
        s = (f"{format_name(self.concept)}{at} {z}{'>' if self.above else '<'} "
             f"{self.threshold:g}")
        if self.consecutive > 1:
            s += f" for {self.consecutive}"
        if self.release is not None:
            s += f" release {self.release:g}"
        return s

    @classmethod
    def parse(cls, text: str) -> "AlarmRule":
        """Parse ``"concept[@layer] [z] >|< threshold [for N] [release R]"``; the compact
        form of gates works too (``calm>1``, ``calm@20<-0.5``; the ``z`` marker needs a space
        before it: ``calmz>1`` is a raw rule on a concept named ``calmz``).  Linear time."""
        if not isinstance(text, str):
            raise SpecError(f"alarm rule must be a string, got {type(text).__name__}")
        if len(text) > MAX_RULE_CHARS:
            raise SpecError(f"alarm rule is {len(text)} characters long "
                            f"(limit {MAX_RULE_CHARS})")
        g, pos = _scan_rule(text)
        if g is None:
            raise SpecError(f"cannot parse alarm rule {quote_input(text)} at character "
                            f"{pos + 1}; expected e.g. 'desperate z > 2 for 8', "
                            "'calm < -1.5 for 4 release -0.5' or 'sad>2'")
        if g["layer"] is not None and len(g["layer"].lstrip("0")) > _LAYER_DIGITS:
            raise SpecError(f"alarm rule layer {quote_input(g['layer'])} is out of bounds "
                            f"[0, {MAX_LAYER})")
        if g["n"] is not None and len(g["n"].lstrip("0")) > _COUNT_DIGITS:
            raise SpecError(f"alarm rule count {quote_input(g['n'])} must be in [1, 1e6]")
        rel = g["rel"]
        return cls(concept=unquote_name(g["concept"]), threshold=float(g["thr"]),
                   above=g["op"] == ">", zscore=g["z"] is not None,
                   consecutive=int(g["n"] or 1),
                   release=float(rel) if rel is not None else None,
                   layer=int(g["layer"]) if g["layer"] is not None else None)


class AlarmState:
    """Device tensors holding every (request slot, rule) alarm state.

    ``run``, ``release_run`` int32 ``[R, N]``; ``active`` bool ``[R, N]`` for R request slots and
    N rules.  :meth:`step` consumes one position per request at a time.
    """

    def __init__(self, rules: Sequence[AlarmRule], max_requests: int, device):
        self.rules = list(rules)
        n = len(self.rules)
        self.n = n
        dev = torch.device(device)
        self.threshold = torch.tensor([r.threshold for r in rules], dtype=torch.float32,
                                      device=dev)
        self.release = torch.tensor(
            [r.threshold if r.release is None else r.release for r in rules],
            dtype=torch.float32, device=dev)
        self.above = torch.tensor([r.above for r in rules], dtype=torch.bool, device=dev)
        self.consecutive = torch.tensor([r.consecutive for r in rules], dtype=torch.int32,
                                        device=dev)
        self.release_after = torch.tensor([r.release_after for r in rules], dtype=torch.int32,
                                          device=dev)
        self.run = torch.zeros(max_requests, n, dtype=torch.int32, device=dev)
        self.release_run = torch.zeros_like(self.run)
        self.active = torch.zeros(max_requests, n, dtype=torch.bool, device=dev)

    def reset(self, slot: int) -> None:
        self.run[slot] = 0
        self.release_run[slot] = 0
        self.active[slot] = False

    def step(self, values: Tensor, req: Tensor) -> Tensor:
        """Advance the tokens ``values [M, N]`` of M distinct request slots ``req [M]``.

        Returns ``fired [M, N]`` bool: which rules fired on these tokens.  NaN values meet no
        condition (they reset ``run``).
        """
        run, rrun, active = self.run[req], self.release_run[req], self.active[req]
        cond = torch.where(self.above, values > self.threshold, values < self.threshold)
        run = torch.where(cond, run + 1, torch.zeros_like(run))
        fired = ~active & (run >= self.consecutive)
        active = active | fired
        quiet = torch.where(self.above, values <= self.release, values >= self.release)
        rrun = torch.where(active & ~fired & quiet, rrun + 1, torch.zeros_like(rrun))
        cleared = active & (rrun >= self.release_after)
        active = active & ~cleared
        run = torch.where(cleared, torch.zeros_like(run), run)
        rrun = torch.where(cleared, torch.zeros_like(rrun), rrun)
        self.run[req], self.release_run[req], self.active[req] = run, rrun, active
        return fired


def parse_rules(rules: Sequence) -> List[AlarmRule]:
    """Accept AlarmRule objects or their string forms."""
    out = []
    for r in rules:
        out.append(r if isinstance(r, AlarmRule) else AlarmRule.parse(r))
    return out
