"""vLLM integration: the junction op at vLLM's fused add+RMSNorm sites, via vLLM's plugin system.

Installed as the ``vllm.general_plugins`` entry point ``steerkernel`` (see ``setup.py``), so
vLLM calls :func:`register` in each of its processes; nothing happens to an engine until it is
started with a steerkernel section in ``additional_config``::

    from vllm import LLM, SamplingParams
    from steerkernel.integrations import vllm as skv

    llm = LLM(model_dir, additional_config=skv.engine_config("emotions.safetensors"))
    outs = skv.generate(llm, ["Tell me about your day."],
                        SamplingParams(max_tokens=64, temperature=0),
                        programs=["calm=+0.05@10-20"])
    outs[0].text, outs[0].report.trace            # text, [n_tokens, L, K] projections

or per request with plain vLLM: ``SamplingParams(extra_args={"steerkernel": "calm=+0.05",
"steerkernel_id": "r1"})`` (``vllm_xargs`` on the OpenAI-compatible server), reports via
:func:`fetch_reports` or the monitor's JSONL / Prometheus sinks.  See ``docs/vllm.md``.

Importing this package does not import vLLM; :func:`register` does.
"""
from __future__ import annotations

from .config import (CONFIG_KEY, EXTRA_ID, EXTRA_MONITOR, EXTRA_PROGRAM, PluginConfig,
                     parse_config)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: install the hooks (idempotent, cheap when no
    engine in this process uses a steerkernel config)."""
    from .patches import install

    install()


def __getattr__(name):  # lazy: the caller-side API loads on first use
    if name.startswith("__") or name == "frontend":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    frontend = importlib.import_module(__name__ + ".frontend")
    if name in frontend.__all__:
        return getattr(frontend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["register", "generate", "steer_params", "fetch_reports", "fetch_raw", "status",
           "engine_config", "SteeredOutput", "VllmReport", "PluginConfig", "parse_config",
           "CONFIG_KEY", "EXTRA_PROGRAM", "EXTRA_ID", "EXTRA_MONITOR"]
