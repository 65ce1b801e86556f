"""Where the plugin meets vLLM: wrappers installed by :func:`install` (idempotent).

vLLM's ``vllm.general_plugins`` entry point runs :func:`steerkernel.integrations.vllm.register`
in every vLLM process (front end, engine core, workers).  It installs:

* the out-of-tree ``RMSNorm`` (:mod:`.norm`): dormant until a worker gives it a site;
* ``InputProcessor.process_inputs`` (front end): the steerkernel keys of a request's
  ``extra_args`` are checked against the engine's bank before the request is admitted, so a bad
  one fails alone with a ``VLLMValidationError`` (HTTP 400 on the server); a steered request's
  prefix-cache salt is set to its program, so KV blocks computed under one program are never
  reused by a request with another (or none);
* ``Worker.load_model`` (worker): after the model is loaded, a :class:`WorkerState` is built when
  the engine has a ``steerkernel`` config; ``Worker.steerkernel_rpc`` serves
  ``collective_rpc("steerkernel_rpc", args=(op, ...))``;
* the model runner (``execute_model`` and the method that lays out the batch: V1's
  ``_prepare_inputs``, V2's ``prepare_inputs``): per-step request bookkeeping and the slot
  vector, before the forward; the monitor record after it.

Every wrapper calls the original unchanged when the engine has no steerkernel config.  Each
target is looked up by name; a vLLM version without it makes :func:`install` log which one is
missing (and the worker refuse a steerkernel config) instead of failing at import.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from typing import Callable, Dict, List

log = logging.getLogger("steerkernel.vllm")

_INSTALLED: Dict[str, bool] = {}
MISSING: List[str] = []
#: set to "0" to skip the front-end check (only to test the worker's own fallback)
FRONTEND_CHECK_ENV = "STEERKERNEL_VLLM_FRONTEND_CHECK"


def _wrap(owner, name: str, make: Callable) -> bool:
    fn = getattr(owner, name, None)
    if fn is None:
        MISSING.append(f"{owner.__module__}.{owner.__qualname__}.{name}")
        return False
    if getattr(fn, "_steerkernel_wrapped", False):
        return True
    new = make(fn)
    functools.update_wrapper(new, fn)
    new._steerkernel_wrapped = True
    new._steerkernel_original = fn
    setattr(owner, name, new)
    return True


# ------------------------------------------------------------------------------ front end
def _frontend_check(vllm_config, params):
    """Validate a request's steerkernel arguments; return its canonical program (or None)."""
    from vllm.exceptions import VLLMValidationError

    from .config import compile_cached, config_from_vllm, load_bank, request_args

    extra = getattr(params, "extra_args", None)
    try:
        args = request_args(extra)
        if not args.given:
            return None
        cfg = config_from_vllm(vllm_config)
        if cfg is None:
            raise ValueError("this engine has no steerkernel bank configured (start it with "
                             "additional_config={'steerkernel': {'bank': PATH}})")
        if args.program is None:
            return None
        compiled = compile_cached(args.program, load_bank(cfg.bank))
        return str(compiled.program)
    except VLLMValidationError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is this request's bad argument
        raise VLLMValidationError(f"steerkernel: {e}", parameter="extra_args") from e


def salt_request(request, program: str) -> None:
    """Give a steered request a prefix-cache salt derived from its program: KV blocks computed
    under one program are shared only with requests running the same program."""
    digest = hashlib.sha256(program.encode()).hexdigest()[:16]
    old = getattr(request, "cache_salt", None)
    request.cache_salt = f"steerkernel:{digest}" + (f":{old}" if old else "")


def _patch_frontend() -> None:
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except Exception as e:  # noqa: BLE001
        MISSING.append(f"vllm.v1.engine.input_processor.InputProcessor ({e})")
        return

    def make(orig):
        def process_inputs(self, request_id, prompt, params, *args, **kwargs):
            program = None
            if getattr(params, "extra_args", None) and \
                    os.environ.get(FRONTEND_CHECK_ENV, "1") != "0":
                program = _frontend_check(self.vllm_config, params)
            request = orig(self, request_id, prompt, params, *args, **kwargs)
            if program is not None and getattr(self.cache_config, "enable_prefix_caching",
                                               False):
                salt_request(request, program)
            return request
        return process_inputs

    _wrap(InputProcessor, "process_inputs", make)


# ------------------------------------------------------------------------------ workers
def _setup_worker(worker) -> None:
    from .config import config_from_vllm
    from .worker import WorkerState

    cfg = config_from_vllm(worker.vllm_config)
    if cfg is None:
        return
    if MISSING:
        raise RuntimeError("steerkernel: this vLLM version lacks the hooks the plugin needs: "
                           + ", ".join(MISSING))
    from vllm.model_executor.custom_op import op_registry_oot

    from .norm import steer_rmsnorm_class

    if op_registry_oot.get("RMSNorm") is not steer_rmsnorm_class():
        raise RuntimeError("steerkernel: another plugin replaced vLLM's RMSNorm; the junction "
                           "cannot be installed")
    runner = worker.model_runner
    model = runner.get_model()
    state = WorkerState(cfg, worker.vllm_config, model, runner.device)
    runner._steerkernel = state
    worker._steerkernel = state


def _steerkernel_rpc(self, op: str, *args, **kwargs):
    """``collective_rpc("steerkernel_rpc", args=(op, ...))``: see :meth:`WorkerState.rpc`."""
    state = getattr(self, "_steerkernel", None)
    if state is None:
        if op == "status":
            return None
        raise RuntimeError("steerkernel: this engine has no steerkernel config "
                           "(additional_config={'steerkernel': {'bank': PATH}})")
    return state.rpc(op, *args, **kwargs)


def _patch_worker() -> None:
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except Exception as e:  # noqa: BLE001
        MISSING.append(f"vllm.v1.worker.gpu_worker.Worker ({e})")
        return

    def make(orig):
        def load_model(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            _setup_worker(self)
            return out
        return load_model

    _wrap(Worker, "load_model", make)
    if not hasattr(Worker, "steerkernel_rpc"):
        Worker.steerkernel_rpc = _steerkernel_rpc


def _state(runner):
    return runner.__dict__.get("_steerkernel")


def _make_execute(orig, v2: bool):
    def execute_model(self, scheduler_output, *args, **kwargs):
        st = _state(self)
        if st is None or (v2 and kwargs.get("dummy_run", False)):
            return orig(self, scheduler_output, *args, **kwargs)
        st.begin_step(scheduler_output)
        ok = False
        try:
            out = orig(self, scheduler_output, *args, **kwargs)
            ok = True
            return out
        finally:
            if ok:
                st.end_forward()
            else:
                st.fwd = None
    return execute_model


def _patch_runner_v1() -> None:
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception as e:  # noqa: BLE001
        MISSING.append(f"vllm.v1.worker.gpu_model_runner.GPUModelRunner ({e})")
        return

    def make_prepare(orig):
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
            st = _state(self)
            if st is not None:
                ib = self.input_batch
                n = ib.num_reqs
                reqs = self.requests

                def lookup(rid):
                    rs = reqs.get(rid)
                    return None if rs is None else (rs.sampling_params, rs.num_prompt_tokens)

                st.set_layout(ib.req_ids[:n], num_scheduled_tokens,
                              ib.num_computed_tokens_cpu[:n], lookup)
            return orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        return _prepare_inputs

    _wrap(GPUModelRunner, "execute_model", lambda f: _make_execute(f, False))
    _wrap(GPUModelRunner, "_prepare_inputs", make_prepare)


def _patch_runner_v2() -> None:
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except Exception as e:  # noqa: BLE001 - V2 is optional (GPU builds)
        log.debug("steerkernel: no V2 model runner (%s)", e)
        return

    def make_prepare(orig):
        def prepare_inputs(self, *args, **kwargs):
            ib = orig(self, *args, **kwargs)
            st = _state(self)
            if st is not None:
                st.set_layout(list(ib.req_ids), ib.num_scheduled_tokens,
                              ib.num_computed_tokens_np)
            return ib
        return prepare_inputs

    _wrap(GPUModelRunner, "execute_model", lambda f: _make_execute(f, True))
    _wrap(GPUModelRunner, "prepare_inputs", make_prepare)


def install() -> None:
    """Install every hook (once per process)."""
    if _INSTALLED.get("done"):
        return
    from .norm import register_norm

    if not register_norm():
        log.warning("steerkernel: vLLM's RMSNorm was already replaced by another plugin; "
                    "steerkernel stays inactive")
        _INSTALLED["done"] = True
        return
    _patch_frontend()
    _patch_worker()
    _patch_runner_v1()
    _patch_runner_v2()
    if MISSING:
        log.warning("steerkernel: vLLM hooks not found (a config with a bank will be "
                    "refused): %s", ", ".join(MISSING))
    _INSTALLED["done"] = True
