"""Where the plugin meets vLLM: the wrappers :func:`install` puts on vLLM's internals.

vLLM's ``vllm.general_plugins`` entry point runs :func:`steerkernel.integrations.vllm.register`
in every vLLM process (front end, engine core, workers).  It registers the out-of-tree
``RMSNorm`` (:mod:`.norm`: dormant until a worker gives it a site), then wraps the methods
listed in the installed vLLM version's table in :mod:`.touchpoints` (what each does, why, and
which documented interface would replace it), with the wrapper of each row's ``kind``
(:data:`WRAPPERS`):

* ``input_processing`` (front end): a request's steerkernel ``extra_args`` are checked against
  the engine's bank before admission, so a bad one fails alone with a ``VLLMValidationError``
  (HTTP 400 on the server); a steered request's prefix-cache salt is set to its program;
* ``async_admission`` (``AsyncLLM``, the API server): the same check runs in a thread, off the
  event loop, and a :class:`SlotLedger` refuses a steered request the workers' slot tables
  could not hold (HTTP 429 now, HTTP 400 never fits) instead of serving it unsteered;
* ``completions_admission`` / ``chat_admission`` (vLLM's OpenAI server): the same check and
  the slot reservation run before the response starts (:class:`Preadmission`), so a streamed
  request is refused with a real HTTP 400 / 429, not an error event inside an HTTP 200 stream;
* ``worker_load``: after the model is loaded, a :class:`WorkerState` is built when the engine
  has a ``steerkernel`` config; ``Worker.steerkernel_rpc`` serves
  ``collective_rpc("steerkernel_rpc", args=(op, ...))``;
* ``execute_v1`` / ``execute_v2`` and ``batch_layout_v1`` / ``batch_layout_v2`` (model
  runner): per-step request bookkeeping and the slot vector before the forward, the monitor
  record after it.

Every wrapper calls the original unchanged when the engine has no steerkernel config.  A
touch point missing from the installed vLLM makes :func:`install` log which one (with the vLLM
version) and the worker refuse a steerkernel config with that message, instead of failing at
import.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import os
import threading
import time
import weakref
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

from . import touchpoints

log = logging.getLogger("steerkernel.vllm")

_INSTALLED: Dict[str, bool] = {}
#: the touch points (``module.Class.method``) not found in the installed vLLM
MISSING: List[str] = []
#: the message naming them and the vLLM version (None when nothing is missing)
MISSING_MESSAGE: Optional[str] = None
#: set to "0" to skip the front-end check (only to test the worker's own fallback)
FRONTEND_CHECK_ENV = "STEERKERNEL_VLLM_FRONTEND_CHECK"


def _wrap(owner, name: str, make: Callable) -> None:
    fn = getattr(owner, name)
    if getattr(fn, "_steerkernel_wrapped", False):
        return
    new = make(fn)
    functools.update_wrapper(new, fn)
    new._steerkernel_wrapped = True
    new._steerkernel_original = fn
    setattr(owner, name, new)


# ------------------------------------------------------------------------------ front end
def _frontend_check(vllm_config, params):
    """Validate a request's steerkernel arguments; return ``(compiled program or None,
    RequestOptions)``.

    Bounded by the caps of :mod:`steerkernel.steering` but it can still take milliseconds
    (a 16 KB program, a big bank): the async path runs it in a thread
    (:func:`_wrap_async_add_request`), never on the server's event loop."""
    from vllm.exceptions import VLLMValidationError

    from .config import (RequestOptions, compile_cached, config_from_vllm, load_bank,
                         request_args, request_options)

    extra = getattr(params, "extra_args", None)
    try:
        args = request_args(extra)
        if not args.given:
            return None, RequestOptions()
        cfg = config_from_vllm(vllm_config)
        if cfg is None:
            raise ValueError("this engine has no steerkernel bank configured (start it with "
                             "additional_config={'steerkernel': {'bank': PATH}})")
        bank = load_bank(cfg.bank)
        options = request_options(args, bank, cfg)
        if args.program is None:
            return None, options
        return compile_cached(args.program, bank), options
    except VLLMValidationError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is this request's bad argument
        raise VLLMValidationError(f"steerkernel: {e}", parameter="extra_args") from e


def _steerkernel_given(extra_args) -> bool:
    """Whether ``extra_args`` (already accepted by :func:`_frontend_check`) hold any
    steerkernel key."""
    from .config import request_args

    return request_args(extra_args).given


def _wants_check(params) -> bool:
    return bool(getattr(params, "extra_args", None)) and \
        os.environ.get(FRONTEND_CHECK_ENV, "1") != "0"


#: ``id(params)`` -> ``(params, (compiled, options))`` checked by the async path (in a thread)
#: for the ``process_inputs`` call of the same request, which then does not check it again
_PRECHECKED: Dict[int, Tuple[object, object]] = {}


def salt_request(request, program: str) -> None:
    """Give a steered request a prefix-cache salt derived from its program: KV blocks computed
    under one program are shared only with requests running the same program."""
    digest = hashlib.sha256(program.encode()).hexdigest()[:16]
    old = getattr(request, "cache_salt", None)
    request.cache_salt = f"steerkernel:{digest}" + (f":{old}" if old else "")


def cache_key(compiled, options) -> Optional[str]:
    """What a request's KV blocks may be shared on: ``None`` (no steering: shared with every
    unsteered request), the program's text (a program whose steering at a position depends on
    the tokens up to it only), or ``"private"`` (shared with no other request).

    vLLM caches blocks that hold *generated* tokens too, and a later request (the next turn of
    a chat) reads them as *prompt* positions.  So blocks are private when the steering of a
    position depends on more than its prefix: a phase-dependent program (``:prompt`` /
    ``:generated``, whose steering of a token depends on which request generated it), a latch
    (state a cache hit would not rebuild), or a steer action on an alarm (it switches the
    program mid-request)."""
    from .config import slots_needed

    switched = getattr(options, "switched", None)
    if switched is not None and slots_needed(switched):
        return "private"
    if compiled is None or not slots_needed(compiled):
        return None
    if compiled.phase_dependent or compiled.latched:
        return "private"
    return str(compiled.program)


def _wrap_process_inputs(orig):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        checked = None
        if _wants_check(params):
            got = _PRECHECKED.get(id(params))
            if got is not None and got[0] is params:
                checked = got[1]
            else:
                checked = _frontend_check(self.vllm_config, params)
        request = orig(self, request_id, prompt, params, *args, **kwargs)
        if checked is not None and getattr(self.cache_config, "enable_prefix_caching", False):
            key = cache_key(*checked)
            if key == "private":
                salt_request(request, f"private:{request_id}:{os.urandom(8).hex()}")
            elif key is not None:
                salt_request(request, key)
        return request
    return process_inputs


class SlotLedger:
    """The steering slots one ``AsyncLLM``'s in-flight steered requests hold (front end).

    A steered request holds its slots (:func:`~.config.slots_needed`, × ``n`` for parallel
    samples) from admission until it leaves the output processor (finished or aborted), so
    the workers' slot tables (``capacity = slot_count - 1``) can never run out behind the
    server: a request that would not fit now is refused with HTTP 429, one that can never fit
    with HTTP 400 (docs/vllm.md, "Steering slots").

    Keys of :attr:`held`: a vLLM request id (held until the request leaves the output
    processor), a pending token of :meth:`reserve` (until :meth:`bind` / :meth:`cancel`), or
    a :class:`Preadmission` (slots an OpenAI request reserved before its response started,
    handed to its engine requests by :meth:`take`; given back by :meth:`release`, or when
    unused past its deadline)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.held: Dict[object, int] = {}
        self._lock = threading.Lock()

    def reserve(self, need: int, alive: Callable[[str], bool], key: object = None) -> object:
        """Reserve ``need`` slots under ``key`` (default: a new pending token); return the key."""
        from http import HTTPStatus

        from vllm.exceptions import GracefulHTTPError, VLLMValidationError

        now = time.monotonic()
        with self._lock:
            for k in list(self.held):
                if (isinstance(k, str) and not alive(k)) or \
                        (isinstance(k, Preadmission) and k.deadline < now):
                    del self.held[k]
            if need > self.capacity:
                raise VLLMValidationError(
                    f"steerkernel: this request needs {need} steering slots but the engine has "
                    f"{self.capacity} (raise the plugin's max_slots, or lower n)",
                    parameter="extra_args")
            used = sum(self.held.values())
            if used + need > self.capacity:
                raise GracefulHTTPError(
                    f"steerkernel: no free steering slot ({used} of {self.capacity} held by "
                    "in-flight steered requests); retry later, or raise the plugin's max_slots",
                    HTTPStatus.TOO_MANY_REQUESTS)
            key = object() if key is None else key
            self.held[key] = need
            return key

    def bind(self, token: object, request_id: str) -> None:
        with self._lock:
            self.held[request_id] = self.held.pop(token)

    def take(self, pre: "Preadmission", need: int) -> Optional[object]:
        """Move ``need`` of ``pre``'s slots to a new pending token (for :meth:`bind`); None
        (nothing moved) when ``pre`` no longer holds that many (expired or released)."""
        with self._lock:
            have = self.held.get(pre, 0)
            if have < need:
                return None
            if have == need:
                del self.held[pre]
            else:
                self.held[pre] = have - need
            token = object()
            self.held[token] = need
            return token

    def cancel(self, token: object) -> None:
        with self._lock:
            self.held.pop(token, None)

    release = cancel


def _ledger(engine) -> SlotLedger:
    from .config import config_from_vllm, slot_count

    led = engine.__dict__.get("_steerkernel_ledger")
    if led is None:
        cfg = config_from_vllm(engine.vllm_config)
        led = SlotLedger(slot_count(cfg, engine.vllm_config.scheduler_config.max_num_seqs) - 1)
        engine._steerkernel_ledger = led
    return led


def _alive(engine) -> Callable[[str], bool]:
    out = engine.output_processor
    return lambda rid: rid in out.request_states or rid in out.parent_requests


def _request_slots(compiled, options, n) -> int:
    from .config import action_slots, slots_needed

    per = (slots_needed(compiled) if compiled is not None else 0) + action_slots(options)
    return per * max(1, int(n or 1))


class Preadmission:
    """An OpenAI request checked and given its slots by the HTTP layer before its response
    started (:func:`_wrap_openai_create`), so that a streamed request, too, is refused with
    a real HTTP 400 / 429 instead of an error event inside an HTTP 200 stream.  Its engine
    requests (one per prompt) find it by their ``extra_args`` (the request's ``vllm_xargs``
    object) in :func:`_wrap_async_add_request` and take ``per_request`` slots each."""

    __slots__ = ("xargs", "compiled", "options", "per_request", "deadline", "ledger")

    def __init__(self, xargs, compiled, options, per_request: int, ledger):
        self.xargs, self.compiled, self.options = xargs, compiled, options
        self.per_request, self.ledger = per_request, ledger
        self.deadline = time.monotonic() + PREADMISSION_TTL_S


#: seconds a preadmission's unused slots stay reserved at most (a backstop: they are handed to
#: its engine requests within milliseconds, and given back when its response ends or its
#: unstarted stream is collected)
PREADMISSION_TTL_S = 30.0
#: ``id(vllm_xargs)`` -> its :class:`Preadmission` (the object is kept, so the id is not reused)
_PREADMITTED: Dict[int, Preadmission] = {}


def _find_preadmission(params) -> Optional[Preadmission]:
    xargs = getattr(params, "extra_args", None)
    pre = _PREADMITTED.get(id(xargs)) if xargs is not None else None
    return pre if pre is not None and pre.xargs is xargs else None


def _drop_preadmission(pre: Preadmission) -> None:
    if _PREADMITTED.get(id(pre.xargs)) is pre:
        del _PREADMITTED[id(pre.xargs)]
    if pre.ledger is not None:
        pre.ledger.release(pre)


def _prompt_count(request) -> int:
    """Engine requests an OpenAI request becomes (one per prompt of a completions batch)."""
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def _wrap_openai_create(orig):
    """``create_completion`` / ``create_chat_completion`` of vLLM's OpenAI server: check a
    steered request and reserve its slots before the response starts (HTTP 400 / 429 for a
    streamed request too); hand the reservation to its engine requests; give back what they
    did not take when the response ends (or its unstarted stream is collected; at the latest
    after PREADMISSION_TTL_S)."""
    async def create(self, request, *args, **kwargs):
        xargs = getattr(request, "vllm_xargs", None)
        engine = getattr(self, "engine_client", None)
        params = SimpleNamespace(extra_args=xargs)
        if not xargs or not _wants_check(params) or \
                getattr(engine, "output_processor", None) is None:
            return await orig(self, request, *args, **kwargs)
        compiled, options = await asyncio.to_thread(_frontend_check, engine.vllm_config, params)
        if getattr(request, "use_beam_search", False) and _steerkernel_given(xargs):
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                "steerkernel: use_beam_search cannot carry steering, readings or alarm actions "
                "(vLLM's beam search drops a request's extra_args, so the request would run "
                "unsteered); send it without use_beam_search or without the steerkernel "
                "fields", parameter="use_beam_search")
        per = _request_slots(compiled, options, getattr(request, "n", 1))
        ledger = _ledger(engine) if per else None
        pre = Preadmission(xargs, compiled, options, per, ledger)
        if ledger is not None:
            ledger.reserve(per * _prompt_count(request), _alive(engine), key=pre)
        _PREADMITTED[id(xargs)] = pre
        streaming = False
        try:
            result = await orig(self, request, *args, **kwargs)
            if inspect.isasyncgen(result):
                result, streaming = _drop_when_done(result, pre), True
                # a stream dropped unstarted (client gone before the first byte) runs no
                # finally: give the slots back when it is collected
                weakref.finalize(result, _drop_preadmission, pre)
            return result
        finally:
            if not streaming:
                _drop_preadmission(pre)
    return create


async def _drop_when_done(stream, pre: Preadmission):
    try:
        async for chunk in stream:
            yield chunk
    finally:
        _drop_preadmission(pre)
        await stream.aclose()


def _wrap_async_add_request(orig):
    async def add_request(self, request_id, prompt, params, *args, **kwargs):
        if not _wants_check(params):
            return await orig(self, request_id, prompt, params, *args, **kwargs)
        n = getattr(params, "n", 1)
        pre = _find_preadmission(params)
        if pre is not None:  # checked by the HTTP layer (_wrap_openai_create)
            compiled, options = pre.compiled, pre.options
        else:  # off the event loop: one request's validation never stalls the others
            compiled, options = await asyncio.to_thread(_frontend_check, self.vllm_config,
                                                        params)
        need = _request_slots(compiled, options, n)
        ledger = token = None
        if need:
            ledger = _ledger(self)
            if pre is not None and pre.ledger is ledger:
                token = ledger.take(pre, need)
            if token is None:
                token = ledger.reserve(need, _alive(self))
        _PRECHECKED[id(params)] = (params, (compiled, options))
        try:
            queue = await orig(self, request_id, prompt, params, *args, **kwargs)
        except BaseException:
            if token is not None:
                ledger.cancel(token)
            raise
        finally:
            _PRECHECKED.pop(id(params), None)
        if token is not None:
            ledger.bind(token, getattr(queue, "request_id", None) or request_id)
        return queue
    return add_request


# ------------------------------------------------------------------------------ workers
def _setup_worker(worker) -> None:
    from .config import config_from_vllm
    from .worker import WorkerState

    cfg = config_from_vllm(worker.vllm_config)
    if cfg is None:
        return
    if MISSING:
        raise RuntimeError(MISSING_MESSAGE)
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


def _wrap_load_model(orig):
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        _setup_worker(self)
        return out
    return load_model


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


def _wrap_prepare_inputs_v1(orig):
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


def _wrap_prepare_inputs_v2(orig):
    def prepare_inputs(self, *args, **kwargs):
        ib = orig(self, *args, **kwargs)
        st = _state(self)
        if st is not None:
            st.set_layout(list(ib.req_ids), ib.num_scheduled_tokens, ib.num_computed_tokens_np)
        return ib
    return prepare_inputs


# ------------------------------------------------------------------------------ alarm stops
def _wrap_sample_tokens(orig):
    def sample_tokens(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        st = _state(self)
        if st is not None and st._stops and out is not None and hasattr(out, "__dict__"):
            out._steerkernel_stops = st.take_stops()
        return out
    return sample_tokens


def _wrap_update_from_output(orig):
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        stops = getattr(model_runner_output, "__dict__", {}).get("_steerkernel_stops")
        if stops:
            from .readings import add_stop

            for rid, label in stops.items():
                add_stop(rid, label)
        return orig(self, scheduler_output, model_runner_output, *args, **kwargs)
    return update_from_output


def _wrap_update_request_with_output(orig):
    def _update_request_with_output(self, request, new_token_ids, *args, **kwargs):
        new_ids, stopped = orig(self, request, new_token_ids, *args, **kwargs)
        from .readings import PENDING_STOPS, take_stop

        if PENDING_STOPS and new_ids:
            label = take_stop(request.request_id)
            if label is not None and not stopped:
                from vllm.v1.request import RequestStatus

                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = label
                stopped = True
        return new_ids, stopped
    return _update_request_with_output


# ------------------------------------------------------------------------------ API server
def _wrap_async_llm_init(orig):
    def __init__(self, vllm_config, *args, **kwargs):
        from .config import config_from_vllm

        cfg = config_from_vllm(vllm_config)
        pp = int(getattr(getattr(vllm_config, "parallel_config", None),
                         "pipeline_parallel_size", 1) or 1)
        if cfg is not None and pp > 1:
            log.warning("steerkernel: readings in responses are off with pipeline parallelism "
                        "(each stage reads only its own layers); requests asking for them get "
                        "HTTP 400")
        elif cfg is not None:
            from .readings import start_server_book

            start_server_book(cfg)
            plugins = os.environ.get("VLLM_PLUGINS")
            if plugins is None or "steerkernel" not in [p.strip() for p in plugins.split(",")]:
                log.warning(
                    "steerkernel: readings in responses are on; the control routes "
                    "(/v1/steerkernel/concepts, /v1/steerkernel/reports/{id}) are off: vLLM "
                    "adds plugin routes only when the plugin is named in VLLM_PLUGINS; start "
                    "the server with VLLM_PLUGINS=steerkernel to turn them on")
        return orig(self, vllm_config, *args, **kwargs)
    return __init__


def _wrap_init_middleware(orig):
    def init_entrypoints_middleware(args, app, *rest, **kwargs):
        from .server import ReadingsMiddleware

        # added first = innermost: vLLM's CORS and API-key middleware run before it
        app.add_middleware(ReadingsMiddleware)
        return orig(args, app, *rest, **kwargs)
    return init_entrypoints_middleware


#: touch-point kind (:mod:`.touchpoints`) -> the wrapper factory that goes there
WRAPPERS: Dict[str, Callable] = {
    "input_processing": _wrap_process_inputs,
    "async_admission": _wrap_async_add_request,
    "completions_admission": _wrap_openai_create,
    "chat_admission": _wrap_openai_create,
    "worker_load": _wrap_load_model,
    "execute_v1": lambda f: _make_execute(f, False),
    "batch_layout_v1": _wrap_prepare_inputs_v1,
    "sample_stops": _wrap_sample_tokens,
    "scheduler_output": _wrap_update_from_output,
    "scheduler_stop": _wrap_update_request_with_output,
    "readings_channel": _wrap_async_llm_init,
    "response_middleware": _wrap_init_middleware,
    "execute_v2": lambda f: _make_execute(f, True),
    "batch_layout_v2": _wrap_prepare_inputs_v2,
}


def install() -> None:
    """Check the installed vLLM against its touch-point table and install every wrapper
    (once per process)."""
    global MISSING_MESSAGE
    if _INSTALLED.get("done"):
        return
    from .norm import register_norm

    if not register_norm():
        log.warning("steerkernel: vLLM's RMSNorm was already replaced by another plugin; "
                    "steerkernel stays inactive")
        _INSTALLED["done"] = True
        return
    version = touchpoints.installed_vllm_version()
    key, exact = touchpoints.table_version(version)
    tables = touchpoints.TOUCH_POINTS
    if not exact:
        log.warning("steerkernel: no touch-point table for vLLM %s (tables: %s); checking it "
                    "against vLLM %s's", version, ", ".join(sorted(tables)), key)
    missing = []
    for tp in tables[key]:
        try:
            owner = touchpoints.find_owner(tp)
        except LookupError as e:
            if tp.optional:
                log.debug("steerkernel: optional vLLM touch point %s absent (%s)", tp.kind, e)
            else:
                missing.append((tp, str(e)))
            continue
        _wrap(owner, tp.attr, WRAPPERS[tp.kind])
        if tp.kind == "worker_load" and not hasattr(owner, "steerkernel_rpc"):
            owner.steerkernel_rpc = _steerkernel_rpc
    MISSING[:] = [tp.target for tp, _ in missing]
    MISSING_MESSAGE = touchpoints.missing_message(version, key, missing)
    if MISSING_MESSAGE:
        log.warning("%s (an engine with a steerkernel config will be refused)", MISSING_MESSAGE)
    _INSTALLED["done"] = True
