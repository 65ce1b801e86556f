"""Independent judges: score texts with a published instrument that shares nothing with a bank.

The steering evaluation must not grade the bank with the bank (the same directions that write
a concept would also read it back).  A judge here is a published, offline scorer installed from
PyPI that never sees the model:

* ``vader`` (default) -- VADER, the Valence Aware Dictionary and sEntiment Reasoner (Hutto &
  Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media
  Text", ICWSM 2014), package ``vaderSentiment`` 3.3.2, MIT licence.  A human-rated lexicon of
  ~7,500 words and emoticons with rules for negation, intensifiers, "but" and punctuation.
  ``score`` is its ``compound`` valence in ``[-1, 1]`` (-1 most negative, +1 most positive).

A judge measures one axis.  VADER measures *valence*, so it judges a concept through that
concept's valence rating: steering toward ``calm`` (valence +0.45) should raise VADER's score,
steering toward ``desperate`` (-0.8) should lower it.  :func:`expected_sign` gives that sign;
concepts rated near zero valence (|v| < 0.2, e.g. ``surprised``) cannot be judged by a valence
instrument and need an explicit direction from the caller.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import SteerkernelError

#: |valence| below this: the valence judge cannot tell the concept's direction
MIN_JUDGEABLE_VALENCE = 0.2


class JudgeUnavailable(SteerkernelError, RuntimeError):
    """The judge's package is not installed (the message says how to install it)."""


class VaderJudge:
    """VADER compound valence of each text (see the module docs)."""

    name = "vader"
    axis = "valence"
    package = "vaderSentiment"
    citation = ("VADER (Hutto & Gilbert, ICWSM 2014), package vaderSentiment 3.3.2, "
                "MIT licence; compound valence in [-1, 1]")

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise JudgeUnavailable(
                "the 'vader' judge needs the vaderSentiment package: pip install "
                "'steerkernel[eval]' (or pip install vaderSentiment==3.3.2)") from e
        self._sia = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """``[n]`` float64 compound valence of each text (an empty text scores 0)."""
        return np.array([self._sia.polarity_scores(t)["compound"] if t.strip() else 0.0
                         for t in texts], dtype=np.float64)

    def describe(self) -> dict:
        return {"name": self.name, "axis": self.axis, "citation": self.citation}


JUDGES = {"vader": VaderJudge}


def get_judge(name: str = "vader"):
    """A judge by name (``vader``)."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r} (known: {', '.join(JUDGES)})")
    return JUDGES[name]()


def expected_sign(bank, concept: str, direction: Optional[int] = None) -> int:
    """+1 when steering toward ``concept`` should raise the valence judge's score, -1 when it
    should lower it: the sign of the concept's valence rating in ``bank.metadata``, or
    ``direction`` when given.  Raises ValueError for an unrated or near-neutral concept."""
    if direction is not None:
        if direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {direction!r}")
        return int(direction)
    meta = (bank.metadata.get("concepts") or {}).get(concept) or {}
    v = meta.get("valence")
    if not isinstance(v, (int, float)):
        raise ValueError(f"concept {concept!r} has no valence rating in the bank, so the "
                         "valence judge cannot tell which way it should move; give the "
                         "direction explicitly (--direction +1 or -1)")
    if abs(v) < MIN_JUDGEABLE_VALENCE:
        raise ValueError(f"concept {concept!r} is rated near-neutral in valence ({v:+.2f}), so "
                         "a valence judge cannot grade it; give the direction explicitly "
                         "(--direction +1 or -1) if you still want it judged on valence")
    return 1 if v > 0 else -1


__all__ = ["VaderJudge", "get_judge", "expected_sign", "JudgeUnavailable", "JUDGES",
           "MIN_JUDGEABLE_VALENCE"]
