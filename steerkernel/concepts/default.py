"""The default concept bank: the built-in emotion corpus extracted on a model, cached.

:func:`default_bank` returns the emotion bank of a model (default: the embedded
SmolLM2-135M-Instruct).  The first call extracts it from the built-in corpus
(``steerkernel/data/emotions.json``, method ``emotion``, every decoder layer; a progress bar on
stderr) and saves it under ``$STEERKERNEL_CACHE/banks/`` (default
``~/.cache/steerkernel/banks/``, next to the dequantised default model).  Later calls load the
cached file in well under a second.

The cache key is a hash of the model fingerprint (architecture, hidden size, layer count, vocab
size and weight hash, see :func:`steerkernel.introspect.model_fingerprint`), the corpus file's
sha256 and the extraction recipe, so another model, a fine-tune, an edited corpus or a changed
recipe never reuses a stale bank.  The file is written atomically (temp file + rename): an
interrupted first run leaves no broken cache, and a corrupted cached file is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

from ..errors import BankFormatError
from ..introspect import model_fingerprint
from .bank import ConceptBank

#: extraction parameters of the default bank (part of the cache key)
RECIPE = {"corpus": "builtin", "method": "emotion", "layers": "all", "start_offset": 2,
          "variance_share": 0.5, "holdout_every": 5, "max_length": 512, "recipe_version": 1}


def _corpus_sha256() -> str:
    from importlib import resources

    data = resources.files("steerkernel").joinpath("data", "emotions.json").read_bytes()
    return hashlib.sha256(data).hexdigest()


def bank_cache_dir() -> str:
    """``$STEERKERNEL_CACHE/banks`` (default ``~/.cache/steerkernel/banks``)."""
    from ..models import cache_root

    return os.path.join(cache_root(), "banks")


def cache_key(model) -> str:
    """16 hex digits identifying (model fingerprint, corpus, recipe)."""
    fp = model_fingerprint(model)
    blob = json.dumps({"fingerprint": fp, "corpus_sha256": _corpus_sha256(), "recipe": RECIPE},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_bank_path(model) -> str:
    """Where the default emotion bank of ``model`` is (or will be) cached."""
    fp = model_fingerprint(model, with_hash=False)
    stem = f"emotions-{fp.get('model_type') or 'model'}-L{fp['num_layers']}-d{fp['hidden_size']}"
    return os.path.join(bank_cache_dir(), f"{stem}-{cache_key(model)}.safetensors")


def default_bank(model=None, tokenizer=None, *, progress: bool = True, rebuild: bool = False,
                 batch_size: int = 16, verbose: bool = True) -> ConceptBank:
    """The built-in emotion bank of ``model`` (None: the embedded default model), built on
    first use and cached (see the module docs).

    Args:
        model, tokenizer: an HF causal LM and its tokenizer (None: the default model).
        progress: show a progress bar while extracting.
        rebuild: extract again even if a cached bank exists.
        verbose: say on stderr when the bank is being built and where it is saved.
    """
    from .extract import _resolve_model, extract_bank

    model, tokenizer = _resolve_model(model, tokenizer)
    path = default_bank_path(model)
    if not rebuild and os.path.isfile(path):
        try:
            bank = ConceptBank.load(path)
            bank.check_fits(model)
            return _with_shipped_strengths(model, bank)
        except (BankFormatError, ValueError) as e:
            warnings.warn(f"steerkernel: cached default bank {path} is unusable ({e}); "
                          "rebuilding it", stacklevel=2)
    if verbose:
        print(f"steerkernel: building the emotion concept bank for this model (first use; "
              f"cached afterwards in {path})", file=sys.stderr, flush=True)
    bank = extract_bank(model, tokenizer, RECIPE["corpus"], method=RECIPE["method"],
                        layers=None, start_offset=RECIPE["start_offset"],
                        variance_share=RECIPE["variance_share"],
                        holdout_every=RECIPE["holdout_every"], max_length=RECIPE["max_length"],
                        batch_size=batch_size, progress=progress)
    bank.metadata["default_bank"] = {"cache_key": cache_key(model),
                                     "corpus_sha256": _corpus_sha256(), "recipe": RECIPE}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bank.save(path)
    return _with_shipped_strengths(model, bank)


#: the project's own calibration of the embedded model (``steerkernel calibrate --record``)
SHIPPED_STRENGTHS = "calibrated_strengths.json"


def shipped_recommendations(model, bank: ConceptBank) -> dict:
    """``{concept: recommended}`` from ``data/calibrated_strengths.json`` when ``model`` and the
    built-in corpus are the ones it was measured on (fingerprint and corpus hash match), else
    ``{}``.  Only concepts of ``bank`` are returned."""
    from importlib import resources

    ref = resources.files("steerkernel").joinpath("data", SHIPPED_STRENGTHS)
    if not ref.is_file():
        return {}
    data = json.loads(ref.read_text(encoding="utf-8"))
    if data.get("corpus_sha256") != _corpus_sha256() or \
            data.get("model_fingerprint") != model_fingerprint(model):
        return {}
    return {c: r for c, r in (data.get("concepts") or {}).items() if c in bank.names}


def _with_shipped_strengths(model, bank: ConceptBank) -> ConceptBank:
    """Merge the project's calibrated strengths (:func:`shipped_recommendations`) into the
    bank's metadata, in memory only (the cached file stays as extracted)."""
    for name, rec in shipped_recommendations(model, bank).items():
        entry = bank.metadata.setdefault("concepts", {}).setdefault(name, {})
        entry.setdefault("recommended", rec)
    return bank


__all__ = ["default_bank", "default_bank_path", "bank_cache_dir", "cache_key", "RECIPE",
           "shipped_recommendations"]
