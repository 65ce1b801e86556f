"""Caller-side API of the vLLM plugin: steered offline generation and monitor reports."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence

import torch

from ...monitor.engine import AlarmEvent, RequestReport
from .config import (CONFIG_KEY, EXTRA_ID, EXTRA_MONITOR, EXTRA_PROGRAM, check_programs,
                     config_from_vllm, load_bank, program_text)


@dataclass
class VllmReport(RequestReport):
    """A :class:`~steerkernel.monitor.engine.RequestReport` from a vLLM worker, plus:

    ``program``: the request's program (string form, None if unsteered); ``error``: a
    worker-side problem (the request then ran unsteered / unrecorded); ``skipped``: positions
    never computed by this engine (prefix-cache hits), so absent from ``trace``; ``final``:
    False while the request is still running; ``vllm_request_id``: vLLM's internal id."""

    program: Optional[str] = None
    error: Optional[str] = None
    skipped: int = 0
    final: bool = True
    vllm_request_id: Optional[str] = None


@dataclass
class SteeredOutput:
    """One prompt's result from :func:`generate`.

    ``output``: vLLM's ``RequestOutput`` (None when the request was rejected); ``report``: its
    monitor report (None when not monitored); ``reports``: with ``n > 1`` samples, one per
    sample (``report`` is sample 0's); ``error``: why it was rejected (or a worker-side
    warning); ``request_id``: the ``steerkernel_id`` it ran under (sample ``i > 0``:
    ``request_id#i``)."""

    prompt: Any
    program: Optional[str]
    request_id: str
    output: Any = None
    report: Optional[VllmReport] = None
    error: Optional[str] = None
    reports: List[Optional[VllmReport]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.output is not None and self.error is None

    @property
    def token_ids(self) -> List[int]:
        return list(self.output.outputs[0].token_ids) if self.output is not None else []

    @property
    def text(self) -> str:
        return self.output.outputs[0].text if self.output is not None else ""


def engine_config(bank: str, **options) -> Dict[str, dict]:
    """``additional_config`` for ``LLM(...)`` / ``vllm serve --additional-config``: the bank path
    and plugin options (see :class:`~steerkernel.integrations.vllm.config.PluginConfig`)."""
    from .config import parse_config

    section = dict(bank=str(bank), **options)
    parse_config(section)  # fail early, here, on a bad option
    return {CONFIG_KEY: section}


def steer_params(sampling_params=None, program=None, *, request_id: Optional[str] = None,
                 monitor: Optional[bool] = None):
    """A copy of ``sampling_params`` (default: vLLM's defaults) whose ``extra_args`` carry a
    steering program (string form, list of entries, Program, ...), a report id and the monitor
    flag.  Malformed programs raise :class:`~steerkernel.errors.SpecError` here; programs that do
    not fit the engine's bank are rejected by the engine when the request is added."""
    from vllm import SamplingParams

    sp = sampling_params.clone() if sampling_params is not None else SamplingParams()
    extra = dict(sp.extra_args or {})
    text = program_text(program)
    if text is not None:
        extra[EXTRA_PROGRAM] = text
    else:
        extra.pop(EXTRA_PROGRAM, None)
    if request_id is not None:
        extra[EXTRA_ID] = str(request_id)
    if monitor is not None:
        extra[EXTRA_MONITOR] = bool(monitor)
    sp.extra_args = extra or None
    return sp


def _vllm_config(llm):
    engine = getattr(llm, "llm_engine", llm)
    cfg = getattr(engine, "vllm_config", None)
    if cfg is None:
        raise TypeError(f"expected a vllm.LLM, got {type(llm).__name__}")
    return cfg


def _bank(llm):
    cfg = config_from_vllm(_vllm_config(llm))
    if cfg is None:
        raise RuntimeError("this LLM has no steerkernel config: create it with "
                           "additional_config=steerkernel.integrations.vllm.engine_config(BANK)")
    return load_bank(cfg.bank)


def _tensor(x) -> Optional[torch.Tensor]:
    from .worker import unpack_tensor

    return unpack_tensor(x)


def _report(d: Optional[dict]) -> Optional[VllmReport]:
    if not d or "tokens" not in d:
        return None
    alarms = [AlarmEvent(a["request_id"], a["rule"], a["concept"], a["layer"], a["token"],
                         a["value"], a["time"]) for a in d.get("alarms", [])]
    trace = d.get("trace")
    return VllmReport(
        request_id=d["request_id"], names=list(d["names"]), layers=list(d["layers"]),
        tokens=int(d["tokens"]), mean=_tensor(d["mean"]), max=_tensor(d["max"]),
        ema=_tensor(d["ema"]), above=_tensor(d["above"]),
        trace=_tensor(trace), alarms=alarms,
        dropped=int(d.get("dropped", 0)), baseline_mean=_tensor(d["baseline_mean"]),
        baseline_std=_tensor(d["baseline_std"]), program=d.get("program"),
        error=d.get("error"), skipped=int(d.get("skipped", 0)), final=bool(d.get("final")),
        vllm_request_id=d.get("vllm_request_id"))


def _merge(per_worker: Sequence[Optional[dict]]) -> Dict[Hashable, Optional[dict]]:
    """Rank 0 has the monitor data; other ranks only know programs / errors."""
    out: Dict[Hashable, Optional[dict]] = {}
    for got in per_worker:
        for key, d in (got or {}).items():
            have = out.get(key)
            if have is None or ("tokens" not in have and d is not None and "tokens" in d):
                out[key] = d
    return out


def fetch_raw(llm, ids: Optional[Sequence[Hashable]] = None, pop: bool = True
              ) -> Dict[Hashable, Optional[dict]]:
    """Reports as plain dicts (see :func:`fetch_reports`)."""
    got = llm.collective_rpc("steerkernel_rpc", args=("reports", list(ids) if ids is not None
                                                      else None, pop))
    return _merge(got)


def fetch_reports(llm, ids: Optional[Sequence[Hashable]] = None, pop: bool = True
                  ) -> Dict[Hashable, Optional[VllmReport]]:
    """Monitor reports of an ``LLM``'s requests, by id: the request's ``steerkernel_id``
    when it had one, else the caller's request id (``RequestOutput.request_id``).

    ``ids=None`` returns every finished report the engine still keeps (and every open one).
    Finished reports are removed when fetched (``pop``); a request still running gives its
    report so far (``final`` False).  Unknown ids map to None."""
    return {k: _report(d) for k, d in fetch_raw(llm, ids, pop).items()}


def status(llm) -> List[Optional[dict]]:
    """Per worker: the plugin's state (None on an engine without a steerkernel config)."""
    return llm.collective_rpc("steerkernel_rpc", args=("status",))


def generate(llm, prompts, sampling_params=None, programs=None, *, monitor: bool = True,
             use_tqdm: bool = False, **generate_kwargs) -> List[SteeredOutput]:
    """``llm.generate`` with one steering program per prompt, returning outputs and reports.

    Args:
        llm: a ``vllm.LLM`` created with ``additional_config=engine_config(BANK)``.
        prompts: a prompt or a list (anything ``LLM.generate`` takes).
        sampling_params: one ``SamplingParams`` for all, or one per prompt.
        programs: None, one program for all prompts, or one per prompt (None = unsteered);
            each a string (``"calm=+0.05@10-20"``), a list of entry strings, dicts
            (``{"concept": "calm", "op": "add", "value": 0.05}``) or Steer objects, or a Program.
        monitor: fetch each request's monitor report (traces, aggregates, alarms).

    Requests whose program is malformed or does not fit the bank (unknown concept, layer out of
    range, non-finite strength, ...) are not sent: their :class:`SteeredOutput` has ``error``
    set and ``output`` None.  All the others run together in one batch.
    """
    from .config import compile_cached, request_args

    single = not isinstance(prompts, (list, tuple))
    plist = [prompts] if single else list(prompts)
    n = len(plist)
    progs = check_programs(programs, n)
    if sampling_params is None or not isinstance(sampling_params, (list, tuple)):
        sps = [sampling_params] * n
    else:
        if len(sampling_params) != n:
            raise ValueError(f"{len(sampling_params)} sampling params for {n} prompts")
        sps = list(sampling_params)
    bank = _bank(llm)
    results: List[SteeredOutput] = []
    send_idx, send_prompts, send_params = [], [], []
    for i, (p, prog, sp) in enumerate(zip(plist, progs, sps)):
        rid = f"sk-{uuid.uuid4().hex[:16]}"
        res = SteeredOutput(prompt=p, program=None, request_id=rid)
        results.append(res)
        try:
            res.program = program_text(prog)
            if res.program is not None:
                compile_cached(res.program, bank)  # unknown concepts, layers, units, gates
            params = steer_params(sp, res.program, request_id=rid, monitor=monitor)
            request_args(params.extra_args)
        except Exception as e:  # noqa: BLE001 - reject this request only
            res.error = f"{type(e).__name__}: {e}"
            continue
        send_idx.append(i)
        send_prompts.append(p)
        send_params.append(params)
    if send_prompts:
        outs = llm.generate(send_prompts, send_params, use_tqdm=use_tqdm, **generate_kwargs)
        for i, o in zip(send_idx, outs):
            results[i].output = o
        # sample j > 0 of an n > 1 request reports under "<id>#j" (see the worker's keys)
        keys = {i: [results[i].request_id] + [f"{results[i].request_id}#{j}" for j in
                                               range(1, int(getattr(send_params[k], "n", 1)))]
                for k, i in enumerate(send_idx)}
        raw = fetch_raw(llm, [key for i in send_idx for key in keys[i]])
        for i in send_idx:
            d = raw.get(results[i].request_id)
            if d is not None and d.get("error"):
                results[i].error = d["error"]
            if monitor:
                results[i].reports = [_report(raw.get(key)) for key in keys[i]]
                results[i].report = results[i].reports[0]
    return results


__all__ = ["generate", "steer_params", "fetch_reports", "fetch_raw", "status",
           "engine_config", "SteeredOutput", "VllmReport"]
