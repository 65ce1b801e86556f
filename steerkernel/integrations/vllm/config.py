"""Engine configuration and per-request arguments of the vLLM plugin (no vLLM import here).

Engine side (one bank per engine), through vLLM's ``additional_config``::

    LLM(model, additional_config={"steerkernel": {"bank": "/path/bank.safetensors"}})
    vllm serve MODEL --additional-config '{"steerkernel": {"bank": "/path/bank.safetensors",
                                           "jsonl": "/var/log/steer.jsonl"}}'

Request side, through ``SamplingParams.extra_args`` (the OpenAI-compatible server's
``vllm_xargs``), flat keys so that they fit ``vllm_xargs``::

    {"steerkernel": "calm=+0.05@10-20; refusal=ablate",   # the program (string form, or a
                                                           #  list of entry strings)
     "steerkernel_id": "my-request-7",                    # optional: key of the monitor report
     "steerkernel_monitor": False}                        # optional: do not record this one
"""
from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ...errors import BankMismatchError, SpecError
from ...steering import MAX_ENTRIES, MAX_PROGRAM_CHARS, quote_input

#: key of the plugin's section in vLLM's ``additional_config``
CONFIG_KEY = "steerkernel"
#: ``extra_args`` keys a request may carry
EXTRA_PROGRAM = "steerkernel"
EXTRA_ID = "steerkernel_id"
EXTRA_MONITOR = "steerkernel_monitor"
from .readings import EXTRA_ON_ALARM, EXTRA_REPORT, EXTRA_STREAM  # noqa: E402
EXTRA_KEYS = (EXTRA_PROGRAM, EXTRA_ID, EXTRA_MONITOR, EXTRA_REPORT, EXTRA_ON_ALARM,
              EXTRA_STREAM)
MAX_ID_CHARS = 256


@dataclass(frozen=True)
class PluginConfig:
    """The ``additional_config["steerkernel"]`` section (every key optional except ``bank``).

    Attributes:
        bank: path of a :class:`steerkernel.ConceptBank` (``.safetensors``) readable by every
            worker (on every node).
        monitor: record per-request scores (on TP rank 0 only).
        keep_traces: keep per-token traces ``[n_tokens, L, K]`` (else aggregates only).
        rules: alarm rules (strings, see :mod:`steerkernel.monitor.alarms`).
        jsonl: append alarms and per-request summaries to this JSONL file (rank 0).
        prometheus_port: serve Prometheus metrics on 127.0.0.1:PORT from the rank-0 worker.
        max_finished: finished reports kept for :func:`fetch_reports` (oldest dropped first;
            each holds its per-token readings, ~100 KB for 60 tokens x 30 layers x 8 concepts,
            so the default keeps the worker's memory flat within ~30 MB).
        max_finished_bytes: ... and at most this many bytes of their tensors (default 64 MiB;
            long requests with big banks hold MBs each), oldest dropped first.
        max_slots: steering slots (default ``2 * max_num_seqs + 1``: every running request
            can hold a prompt slot and a generated slot).
        backend: junction backend (None: automatic).
        above_z, ema_alpha: monitor aggregates (see :class:`MonitorEngine`).
        check_fingerprint: refuse a bank whose fingerprint names another architecture, hidden
            size, layer count or vocabulary size.
        reports_open: the server's report route (``GET /v1/steerkernel/reports/{id}``) serves
            any report by id, without the token its response gave (default: only with it).
    """

    bank: str
    monitor: bool = True
    keep_traces: bool = True
    rules: Tuple[str, ...] = ()
    jsonl: Optional[str] = None
    prometheus_port: Optional[int] = None
    max_finished: int = 256
    max_finished_bytes: int = 64 << 20
    max_slots: Optional[int] = None
    backend: Optional[str] = None
    above_z: float = 2.0
    ema_alpha: float = 0.1
    check_fingerprint: bool = True
    reports_open: bool = False

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["rules"] = list(self.rules)
        return d


_BOOL = ("monitor", "keep_traces", "check_fingerprint", "reports_open")


def parse_config(raw: Any) -> Optional[PluginConfig]:
    """``additional_config`` (the whole dict, or just the steerkernel section) -> config, or
    None when the engine has no steerkernel section.  Raises :class:`SpecError` naming the
    bad key."""
    if raw is None:
        return None
    if isinstance(raw, PluginConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise SpecError(f"additional_config[{CONFIG_KEY!r}] must be a dict, got "
                        f"{type(raw).__name__}")
    if "bank" not in raw and CONFIG_KEY in raw:
        raw = raw[CONFIG_KEY]
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise SpecError(f"additional_config[{CONFIG_KEY!r}] must be a dict, got "
                            f"{type(raw).__name__}")
    elif "bank" not in raw:
        return None
    known = set(PluginConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"unknown steerkernel config keys {unknown}; known: {sorted(known)}")
    kw = dict(raw)
    bank = kw.get("bank")
    if not isinstance(bank, str) or not bank:
        raise SpecError("steerkernel config needs 'bank': the path of a concept bank file")
    for k in _BOOL:
        if k in kw and not isinstance(kw[k], bool):
            raise SpecError(f"steerkernel config {k!r} must be true or false, got {kw[k]!r}")
    rules = kw.get("rules", ())
    if isinstance(rules, str):
        rules = (rules,)
    if not isinstance(rules, (list, tuple)) or not all(isinstance(r, str) for r in rules):
        raise SpecError("steerkernel config 'rules' must be a list of alarm-rule strings")
    kw["rules"] = tuple(rules)
    for k in ("max_finished", "max_finished_bytes", "max_slots", "prometheus_port"):
        v = kw.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise SpecError(f"steerkernel config {k!r} must be a non-negative int, got {v!r}")
    if kw.get("max_slots") is not None and kw["max_slots"] < 2:
        raise SpecError("steerkernel config 'max_slots' must be >= 2 (slot 0 is the identity)")
    for k in ("above_z", "ema_alpha"):
        if k in kw and (isinstance(kw[k], bool) or not isinstance(kw[k], (int, float))
                        or not math.isfinite(kw[k])):
            raise SpecError(f"steerkernel config {k!r} must be a finite number")
    if kw.get("jsonl") is not None and not isinstance(kw["jsonl"], str):
        raise SpecError("steerkernel config 'jsonl' must be a file path")
    if kw.get("backend") is not None and not isinstance(kw["backend"], str):
        raise SpecError("steerkernel config 'backend' must be a backend name")
    return PluginConfig(**kw)


def config_from_vllm(vllm_config) -> Optional[PluginConfig]:
    """The plugin config of a ``VllmConfig`` (None when it has no steerkernel section)."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, Mapping) or CONFIG_KEY not in extra:
        return None
    return parse_config(extra[CONFIG_KEY])


# ------------------------------------------------------------------------------ the bank
_BANKS: Dict[Tuple[str, float, int], Any] = {}


def load_bank(path: str):
    """Load (and cache per process, keyed by path, mtime and size) the concept bank."""
    from ...concepts import ConceptBank

    real = os.path.abspath(os.path.expanduser(path))
    try:
        st = os.stat(real)
    except OSError as e:
        raise FileNotFoundError(f"steerkernel: concept bank {path!r} not found ({e})") from e
    key = (real, st.st_mtime, st.st_size)
    bank = _BANKS.get(key)
    if bank is None:
        bank = ConceptBank.load(real)
        if len(_BANKS) > 8:
            _BANKS.clear()
        _BANKS[key] = bank
    return bank


_COMPILED: "OrderedDict[Tuple[int, str], Any]" = OrderedDict()
_COMPILED_MAX = 4096
_COMPILED_LOCK = threading.Lock()


def compile_cached(text: str, bank):
    """:func:`steerkernel.steering.compile_program` of a program string against ``bank``,
    memoised per (bank, text): a compiled program is read-only (slot tables copy from it), so
    requests that share a program share one compilation (front end and workers alike)."""
    from ...steering import compile_program

    key = (id(bank), text)
    with _COMPILED_LOCK:  # the API server compiles in threads (patches._wrap_async_add_request)
        hit = _COMPILED.get(key)
        if hit is not None and hit[0] is bank:
            _COMPILED.move_to_end(key)
            return hit[1]
    compiled = compile_program(text, bank)
    with _COMPILED_LOCK:
        _COMPILED[key] = (bank, compiled)
        if len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return compiled


def slot_count(cfg: PluginConfig, max_num_seqs: int) -> int:
    """Rows of a worker's slot tables (row 0 is the identity, so ``slot_count - 1`` programs
    can be held at once): ``max_slots``, default ``2 * max_num_seqs + 1``."""
    return int(cfg.max_slots or 2 * int(max_num_seqs) + 1)


def slots_needed(compiled) -> int:
    """Slots a request with this compiled program holds while it runs: 0 (it steers
    nothing), 1, or 2 (its prompt and generated tables differ)."""
    need = [ph for ph in ("prompt", "generated") if not compiled.identity[ph]]
    if not need:
        return 0
    return 1 if not compiled.phase_dependent or len(need) == 1 else 2


def check_bank_fits(bank, hf_config, check_fingerprint: bool = True,
                    architectures: Sequence[str] = ()) -> None:
    """Raise :class:`BankMismatchError` unless ``bank`` fits the model of ``hf_config`` (the
    text config vLLM serves): hidden size, layer range, site, and (with
    ``check_fingerprint``) the architecture / layer count / vocab size recorded in the bank.
    ``architectures``: more names the served model goes by (vLLM's resolved class, ...)."""
    d = int(hf_config.hidden_size)
    n = int(hf_config.num_hidden_layers)
    problems = []
    if bank.site != "resid_post":
        problems.append(f"site {bank.site!r} (the vLLM plugin supports 'resid_post')")
    if bank.d != d:
        problems.append(f"hidden_size: bank {bank.d}, model {d}")
    out = [x for x in bank.layers if not 0 <= int(x) < n]
    if out:
        problems.append(f"layers {out} do not exist in a model with {n} decoder layers")
    if check_fingerprint:
        fp = bank.fingerprint or {}
        archs = list(getattr(hf_config, "architectures", None) or []) + list(architectures)
        want = fp.get("architecture")
        if want and archs and want not in archs:
            problems.append(f"architecture: bank {want!r}, model {archs}")
        for key, have in (("num_layers", n), ("hidden_size", d),
                          ("vocab_size", getattr(hf_config, "vocab_size", None))):
            want = fp.get(key)
            if want is not None and have is not None and int(want) != int(have):
                problems.append(f"{key}: bank {want!r}, model {have!r}")
    if problems:
        raise BankMismatchError("steerkernel: concept bank does not fit the served model: "
                                + "; ".join(dict.fromkeys(problems)))


# ------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class RequestArgs:
    """The steerkernel part of one request's ``extra_args``."""

    program: Optional[str] = None  # canonical string form (None: not steered)
    tag: Optional[str] = None      # steerkernel_id
    monitor: bool = True
    given: bool = False            # any steerkernel key present
    report: Optional[str] = None   # steerkernel_report (checked against the bank later)
    on_alarm: Optional[str] = None  # steerkernel_on_alarm (checked against the bank later)
    stream: Optional[str] = None   # steerkernel_stream (the server's response tag)


def program_text(program) -> Optional[str]:
    """A program given as a string, a list of entry strings / Steer objects / dicts, a Steer, a
    Program or None -> its string form (None when empty).  Raises :class:`SpecError`.

    The bounds of :mod:`steerkernel.steering` hold whatever the form, checked before the work
    they bound: at most ``MAX_ENTRIES`` list items / entries, ``MAX_PROGRAM_CHARS`` characters
    of input text and of the canonical string form."""
    from ...steering import Program, Steer, Gate

    if program is None:
        return None
    if isinstance(program, str):
        Program.parse(program)  # length, entries, layers and syntax, raises SpecError
        return program if program.strip() else None
    if isinstance(program, Mapping):
        program = [program]
    if isinstance(program, (Program, Steer)):
        prog = Program.coerce(program)
    elif isinstance(program, (list, tuple)):
        if len(program) > MAX_ENTRIES:  # before looking at any item
            raise SpecError(f"steering program has {len(program)} entries "
                            f"(limit {MAX_ENTRIES})")
        steers: List[Steer] = []
        chars = 0
        for item in program:
            if isinstance(item, Steer):
                steers.append(item)
            elif isinstance(item, str):
                chars += len(item)
                if chars > MAX_PROGRAM_CHARS:
                    raise SpecError(f"steering program entries hold more than "
                                    f"{MAX_PROGRAM_CHARS} characters")
                steers.extend(Program.parse(item).steers)
            elif isinstance(item, Mapping):
                d = dict(item)
                gate = d.pop("gate", None)
                try:
                    if isinstance(gate, Mapping):
                        gate = Gate(**gate)
                    steers.append(Steer(**d, gate=gate))
                except TypeError as e:
                    raise SpecError(f"bad steering entry {quote_input(item)}: "
                                    f"{quote_input(str(e))}") from e
            else:
                raise SpecError(f"a steering program entry must be a string, a dict or a "
                                f"Steer, got {type(item).__name__}")
            if len(steers) > MAX_ENTRIES:
                raise SpecError(f"steering program has more than {MAX_ENTRIES} entries")
        prog = Program(tuple(steers))
    else:
        raise SpecError(f"cannot make a steering program from {type(program).__name__}")
    if not len(prog):
        return None
    text = str(prog)
    if len(text) > MAX_PROGRAM_CHARS:
        raise SpecError(f"steering program is {len(text)} characters long in its string form "
                        f"(limit {MAX_PROGRAM_CHARS})")
    Program.parse(text)  # the string form round-trips
    return text


def request_args(extra_args: Optional[Mapping]) -> RequestArgs:
    """Parse the steerkernel keys of ``extra_args``; :class:`SpecError` on malformed ones.

    The program is only parsed here; resolving it against the bank (unknown concepts, layers,
    units) is :func:`steerkernel.steering.compile_program`'s job."""
    if not extra_args:
        return RequestArgs()
    if not isinstance(extra_args, Mapping):
        raise SpecError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    keys = [k for k in extra_args if isinstance(k, str) and k.startswith(EXTRA_PROGRAM)]
    if not keys:
        return RequestArgs()
    unknown = sorted(set(keys) - set(EXTRA_KEYS))
    if unknown:
        raise SpecError(f"unknown steerkernel request keys {quote_input(unknown)}; known: "
                        f"{list(EXTRA_KEYS)}")
    text = program_text(extra_args.get(EXTRA_PROGRAM))
    tag = extra_args.get(EXTRA_ID)
    if tag is not None:
        if not isinstance(tag, (str, int)) or isinstance(tag, bool):
            raise SpecError(f"{EXTRA_ID} must be a string, got {type(tag).__name__}")
        tag = str(tag)
        if not tag or len(tag) > MAX_ID_CHARS or not tag.isprintable():
            raise SpecError(f"{EXTRA_ID} must be 1-{MAX_ID_CHARS} printable characters")
    mon = _flag(extra_args.get(EXTRA_MONITOR, True))
    if mon is None:
        raise SpecError(f"{EXTRA_MONITOR} must be true or false, got "
                        f"{quote_input(extra_args.get(EXTRA_MONITOR))}")
    texts = {}
    for key in (EXTRA_REPORT, EXTRA_ON_ALARM, EXTRA_STREAM):
        v = extra_args.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, str)):
            raise SpecError(f"{key} must be a string, got {type(v).__name__}")
        texts[key] = v
    if texts[EXTRA_STREAM] is not None:
        from .readings import check_stream_tag

        check_stream_tag(texts[EXTRA_STREAM])
    if (texts[EXTRA_REPORT] is not None or texts[EXTRA_ON_ALARM] is not None) and not mon:
        raise SpecError(f"{EXTRA_REPORT} / {EXTRA_ON_ALARM} need the monitor: "
                        f"{EXTRA_MONITOR} cannot be false with them")
    return RequestArgs(text, tag, mon, True, texts[EXTRA_REPORT], texts[EXTRA_ON_ALARM],
                       texts[EXTRA_STREAM])


@dataclass(frozen=True)
class RequestOptions:
    """A request's readings and alarm action resolved against the bank and the engine's
    rules: ``report`` (:class:`~.readings.ReportSpec` or None), ``action``
    (:class:`~.readings.AlarmAction` or None) and, for a steer action, ``switched``: the
    compiled program the request runs once it fires (its own program plus the action's)."""

    report: Any = None
    action: Any = None
    switched: Any = None


def request_options(args: RequestArgs, bank, cfg: PluginConfig) -> RequestOptions:
    """Resolve ``steerkernel_report`` / ``steerkernel_on_alarm``; :class:`SpecError` names
    what does not fit (unknown concept or layer, no alarm rule, a bad program)."""
    if args.report is None and args.on_alarm is None:
        return RequestOptions()
    from ...monitor.alarms import parse_rules
    from .readings import parse_alarm_action, parse_report_spec

    if not cfg.monitor:
        raise SpecError("readings and alarm actions need the engine's monitor (plugin config "
                        "'monitor' is false)")
    report = action = switched = None
    if args.report is not None:
        report = parse_report_spec(args.report, bank.names, [int(x) for x in bank.layers],
                                   bank.default_layer)
    if args.on_alarm is not None:
        action = parse_alarm_action(args.on_alarm, [r.concept for r in parse_rules(cfg.rules)])
        if action.kind == "steer":
            text = f"{args.program}; {action.program}" if args.program else action.program
            switched = compile_cached(text, bank)
    return RequestOptions(report, action, switched)


def action_slots(options: RequestOptions) -> int:
    """Extra slots a request's alarm action may take when it fires (1 for a steer action)."""
    return 1 if options.switched is not None and slots_needed(options.switched) else 0


def _flag(value) -> Optional[bool]:
    """A boolean request flag as clients send it: JSON true / false, or 1 / 0 and "true" /
    "false" (vLLM's ``vllm_xargs`` holds scalars and may turn a bool into an int); else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    return None


_SUFFIX = re.compile(r"^(?P<ext>.+)-[0-9a-f]{8}$")


def external_id(req_id: str) -> str:
    """vLLM appends ``-<8 hex>`` to the caller's request id (unless
    ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION``); undo that to report the caller's id."""
    if os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0") not in ("", "0"):
        return req_id
    m = _SUFFIX.match(req_id)
    return m.group("ext") if m else req_id


def canonical_program(text: Optional[str]) -> Optional[str]:
    """One string per distinct program (for cache salts and dedup): the parsed form."""
    if text is None:
        return None
    from ...steering import Program

    return str(Program.parse(text))


def check_programs(programs: Sequence, n: int) -> List:
    """One program per prompt: None, a single program for all, or a list of ``n``."""
    if programs is None:
        return [None] * n
    if isinstance(programs, (str, Mapping)) or not isinstance(programs, Sequence):
        return [programs] * n
    if len(programs) != n:
        raise SpecError(f"{len(programs)} programs for {n} prompts")
    return list(programs)


__all__ = ["PluginConfig", "parse_config", "config_from_vllm", "load_bank", "check_bank_fits",
           "compile_cached", "slot_count", "slots_needed",
           "RequestArgs", "request_args", "program_text", "external_id", "CONFIG_KEY",
           "EXTRA_PROGRAM", "EXTRA_ID", "EXTRA_MONITOR", "canonical_program",
           "EXTRA_REPORT", "EXTRA_ON_ALARM", "EXTRA_STREAM", "RequestOptions",
           "request_options", "action_slots"]

