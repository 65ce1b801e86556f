"""Alarm rules with hysteresis, evaluated on the device.

A rule watches one concept at one layer, on z-scores (default) or raw projections::

    "desperate z > 2 for 8"                 fire after 8 consecutive tokens with z > 2
    "calm z < -1.5 for 4 release -0.5"      fire after 4 tokens below -1.5; re-arm only once
                                             the value is back at or above -0.5
    "afraid@20 > 3.0"                        raw projection at layer 20, one token suffices

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
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..errors import SpecError

_RULE = re.compile(
    r"^\s*(?P<concept>[A-Za-z_][\w\-]*)(?:@(?P<layer>\d+))?\s+"
    r"(?:(?P<z>z)\s*)?(?P<op>[<>])\s*(?P<thr>[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)"
    r"(?:\s+for\s+(?P<n>\d+))?(?:\s+release\s+(?P<rel>[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?))?\s*$")


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
        s = f"{self.concept}{at} {z}{'>' if self.above else '<'} {self.threshold:g}"
        if self.consecutive > 1:
            s += f" for {self.consecutive}"
        if self.release is not None:
            s += f" release {self.release:g}"
        return s

    @classmethod
    def parse(cls, text: str) -> "AlarmRule":
        """Parse ``"concept[@layer] [z] >|< threshold [for N] [release R]"``."""
        if not isinstance(text, str):
            raise SpecError(f"alarm rule must be a string, got {type(text).__name__}")
        m = _RULE.match(text)
        if not m:
            raise SpecError(f"cannot parse alarm rule {text!r}; expected e.g. "
                            "'desperate z > 2 for 8' or 'calm < -1.5 for 4 release -0.5'")
        rel = m.group("rel")
        return cls(concept=m.group("concept"), threshold=float(m.group("thr")),
                   above=m.group("op") == ">", zscore=m.group("z") is not None,
                   consecutive=int(m.group("n") or 1),
                   release=float(rel) if rel is not None else None,
                   layer=int(m.group("layer")) if m.group("layer") else None)


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
