"""Text corpora for concept extraction: the built-in emotion corpus and user corpora.

A corpus maps concept names to texts that express the concept, plus neutral texts (for the
baseline statistics and the neutral principal components), optional per-concept contrastive
negatives (for ``mean_diff`` / ``pca_diff``), per-concept extras (valence, arousal) and named
ordered series (e.g. ``rising_danger``: texts of steadily increasing danger).

Accepted files:

* JSON (the built-in schema)::

    {"version": 1, "ratings_source": "...",
     "emotions": {"calm": {"valence": 0.6, "arousal": -0.7, "texts": ["...", ...],
                           "negatives": ["...", ...]},          # negatives optional
                  ...},
     "neutral": ["...", ...],
     "rising_danger": ["...", ...]}                             # optional series

  (``"concepts"`` may be used instead of ``"emotions"``; valence/arousal are optional.)

* JSONL, one object per line: ``{"concept": "calm", "text": "..."}`` (a positive example),
  ``{"concept": "calm", "text": "...", "negative": true}`` (a contrastive negative) or
  ``{"neutral": true, "text": "..."}``.

Held-out split (deterministic): within each concept's list, text ``i`` (0-based) is held out
when ``i % every == every - 1`` -- every 5th text by default.  Neutral texts and series are
never held out.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import SteerkernelError
from ..fileio import jsonl_records, read_text_input, text_lines
from .bank import name_problem

BUILTIN = "builtin"
SERIES_KEYS = ("rising_danger",)


class CorpusError(SteerkernelError, ValueError):
    """A corpus file or object is malformed (the message names the problem)."""


@dataclass
class Corpus:
    """Concept texts.  ``texts[c]``: positive texts of concept ``c`` in file order.  A text
    is a string, or (for a model used without a tokenizer) a list of token ids."""

    texts: Dict[str, List[str]]
    neutral: List[str] = field(default_factory=list)
    negatives: Dict[str, List[str]] = field(default_factory=dict)
    extras: Dict[str, dict] = field(default_factory=dict)
    series: Dict[str, List[str]] = field(default_factory=dict)
    source: str = "<memory>"
    ratings_source: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.texts, dict) or not self.texts:
            raise CorpusError(f"corpus {self.source}: no concepts")
        for name, texts in self.texts.items():
            problem = name_problem(name)
            if problem:  # the bank would refuse it after the whole extraction
                raise CorpusError(f"corpus {self.source}: concept name {problem}")
            _check_texts(f"concept {name!r}", texts, self.source, allow_empty=False)
        _check_texts("neutral", self.neutral, self.source, allow_empty=True)
        for name, texts in self.negatives.items():
            if name not in self.texts:
                raise CorpusError(f"corpus {self.source}: negatives given for {name!r}, which "
                                  "has no positive texts")
            _check_texts(f"negatives of {name!r}", texts, self.source, allow_empty=True)
        for name, texts in self.series.items():
            _check_texts(f"series {name!r}", texts, self.source, allow_empty=True)

    @property
    def names(self) -> List[str]:
        return list(self.texts)

    def subset(self, names: Sequence[str]) -> "Corpus":
        """The corpus restricted to concepts ``names`` (in that order)."""
        missing = [n for n in names if n not in self.texts]
        if missing:
            raise CorpusError(f"corpus {self.source} has no concepts {missing} "
                              f"(it has: {', '.join(self.names)})")
        return Corpus({n: self.texts[n] for n in names}, self.neutral,
                      {n: v for n, v in self.negatives.items() if n in names},
                      {n: v for n, v in self.extras.items() if n in names}, self.series,
                      self.source, self.ratings_source)

    def split(self, every: int = 5) -> Tuple["Corpus", Dict[str, List[str]]]:
        """``(train corpus, {concept: held-out texts})``; ``every=0`` holds nothing out.

        Text ``i`` of each concept (and of its negatives) is held out when
        ``i % every == every - 1``.  A concept keeps at least one training text.
        """
        if every < 0 or every == 1:
            raise CorpusError(f"hold-out period must be 0 (none) or >= 2, got {every}")

        def part(texts):
            if every == 0:
                return list(texts), []
            train = [t for i, t in enumerate(texts) if i % every != every - 1]
            held = [t for i, t in enumerate(texts) if i % every == every - 1]
            return (train, held) if train else (list(texts), [])

        texts, held = {}, {}
        for n, ts in self.texts.items():
            texts[n], held[n] = part(ts)
        negatives = {n: part(ts)[0] for n, ts in self.negatives.items()}
        train = Corpus(texts, self.neutral, negatives, self.extras, self.series, self.source,
                       self.ratings_source)
        return train, held


def _check_texts(what: str, texts, source: str, allow_empty: bool) -> None:
    if not isinstance(texts, list):
        raise CorpusError(f"corpus {source}: {what} must be a list of strings, got "
                          f"{type(texts).__name__}")
    if not texts and not allow_empty:
        raise CorpusError(f"corpus {source}: {what} has no texts")
    for i, t in enumerate(texts):
        if isinstance(t, str) and t.strip():
            continue
        if isinstance(t, (list, tuple)) and t and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in t):
            continue  # pre-tokenised text (token ids), for tokenizer-free models
        raise CorpusError(f"corpus {source}: {what} text #{i} is not a non-empty string "
                          f"({str(t)[:60]!r})")


def _number(x, what: str, source: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise CorpusError(f"corpus {source}: {what} must be a finite number, got {x!r}")
    return float(x)


def corpus_from_dict(obj, source: str = "<memory>") -> Corpus:
    """Build a :class:`Corpus` from the JSON schema (see the module docs)."""
    if not isinstance(obj, dict):
        raise CorpusError(f"corpus {source}: top level must be a JSON object")
    if "emotions" in obj and "concepts" in obj:
        raise CorpusError(f"corpus {source}: give 'emotions' or 'concepts', not both")
    concepts = obj.get("emotions", obj.get("concepts"))
    if not isinstance(concepts, dict) or not concepts:
        raise CorpusError(f"corpus {source}: needs a non-empty 'emotions' (or 'concepts') "
                          "object mapping names to {\"texts\": [...]}")
    version = obj.get("version", 1)
    if version != 1:
        raise CorpusError(f"corpus {source}: version {version!r} is not supported (1 is)")
    texts, negatives, extras = {}, {}, {}
    for name, entry in concepts.items():
        if not isinstance(name, str) or not name.strip():
            raise CorpusError(f"corpus {source}: concept names must be non-empty strings, got "
                              f"{name!r}")
        if not isinstance(entry, dict) or "texts" not in entry:
            raise CorpusError(f"corpus {source}: concept {name!r} must be an object with a "
                              "'texts' list")
        texts[name] = entry["texts"]
        if "negatives" in entry:
            negatives[name] = entry["negatives"]
        extra = {}
        for key in ("valence", "arousal"):
            if key in entry:
                extra[key] = _number(entry[key], f"{key} of {name!r}", source)
        extras[name] = extra
    series = {k: obj[k] for k in SERIES_KEYS if k in obj}
    series.update(obj.get("series", {}) if isinstance(obj.get("series"), dict) else {})
    rs = obj.get("ratings_source")
    return Corpus(texts, obj.get("neutral", []), negatives, extras, series, source,
                  rs if isinstance(rs, str) else None)


def corpus_from_jsonl(lines, source: str = "<memory>") -> Corpus:
    """Build a :class:`Corpus` from JSONL lines (see the module docs)."""
    texts: Dict[str, List[str]] = {}
    negatives: Dict[str, List[str]] = {}
    neutral: List[str] = []
    for no, rec in jsonl_records(lines, f"corpus {source}", CorpusError):
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise CorpusError(f"corpus {source} line {no}: expected an object with a 'text' "
                              "string")
        unknown = set(rec) - {"text", "concept", "negative", "neutral"}
        if unknown:
            raise CorpusError(f"corpus {source} line {no}: unknown keys {sorted(unknown)}")
        if rec.get("neutral") is True:
            if "concept" in rec:
                raise CorpusError(f"corpus {source} line {no}: a neutral line has no concept")
            neutral.append(rec["text"])
            continue
        concept = rec.get("concept")
        if not isinstance(concept, str) or not concept.strip():
            raise CorpusError(f"corpus {source} line {no}: needs a 'concept' name (or "
                              "\"neutral\": true)")
        target = negatives if rec.get("negative") is True else texts
        target.setdefault(concept, []).append(rec["text"])
    if not texts:
        raise CorpusError(f"corpus {source}: no concept lines")
    return Corpus(texts, neutral, negatives, {n: {} for n in texts}, {}, source)


def load_builtin() -> Corpus:
    """The built-in emotion corpus (``steerkernel/data/emotions.json``)."""
    from importlib import resources

    ref = resources.files("steerkernel").joinpath("data", "emotions.json")
    if not ref.is_file():
        raise FileNotFoundError("the built-in emotion corpus steerkernel/data/emotions.json is "
                                "missing from this installation")
    return corpus_from_dict(json.loads(ref.read_text(encoding="utf-8")), "builtin:emotions.json")


def load_corpus(spec: Optional[str] = None) -> Corpus:
    """``None`` / ``"builtin"``: the built-in corpus; otherwise a ``.json`` / ``.jsonl`` path."""
    if spec is None or spec == BUILTIN:
        return load_builtin()
    if not os.path.lexists(spec):
        raise FileNotFoundError(f"corpus file {spec!r} does not exist (or use 'builtin')")
    text = read_text_input(spec, "corpus file")  # a regular file, at most 64 MiB
    if spec.endswith(".jsonl"):
        return corpus_from_jsonl(text_lines(text), spec)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CorpusError(f"corpus {spec}: not valid JSON ({why}); JSONL files must end "
                          "in .jsonl") from None
    return corpus_from_dict(obj, spec)
