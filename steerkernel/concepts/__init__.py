"""Concept banks: extraction, files, analysis and interop (see ``docs/concepts.md``)."""
from ..introspect import model_fingerprint
from .bank import ConceptBank
from .corpus import Corpus, CorpusError, load_corpus
from .default import default_bank

__all__ = ["ConceptBank", "Corpus", "CorpusError", "load_corpus", "model_fingerprint",
           "extract_bank", "score_texts", "calibrate"]


def __getattr__(name):  # extraction pulls in tqdm and the op registry only when used
    if name in ("extract_bank", "score_texts", "calibrate"):
        from . import extract

        return getattr(extract, name)
    raise AttributeError(f"module 'steerkernel.concepts' has no attribute {name!r}")
