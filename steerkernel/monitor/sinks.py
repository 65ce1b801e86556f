"""Where monitor events go besides Python callbacks: a JSONL log and Prometheus metrics."""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Dict, Optional, Tuple

log = logging.getLogger("steerkernel.monitor")


class JSONLSink:
    """Appends one JSON object per line: alarms as they fire, a summary per finished request.

    Lines: ``{"event": "alarm", "request_id", "rule", "concept", "layer", "token", "value",
    "time"}`` and ``{"event": "request", "request_id", "tokens", "names", "layers", "mean",
    "max", "ema", "above", "dropped", "alarms": [...]}`` (``layer`` restricts the arrays of the
    summary to one layer; default: every monitored layer).
    """

    def __init__(self, path: str, layer: Optional[int] = None):
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"JSONL sink path {path!r} is a directory")
        self.path, self.layer = path, layer
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")

    def _write(self, obj) -> None:
        with self._lock:
            self._f.write(json.dumps(obj) + "\n")
            self._f.flush()

    def alarm(self, event) -> None:
        self._write(event.to_dict())

    def request(self, report) -> None:
        d = report.to_dict(self.layer if self.layer in report.layers else None)
        d["event"] = "request"
        self._write(d)

    def close(self) -> None:
        self._f.close()


#: metrics already registered, per registry (``id(registry)`` -> (registry, metrics)): a
#: second sink on the same registry (the process-wide default one included) reuses them
#: instead of failing with prometheus_client's "Duplicated timeseries"
_METRICS: Dict[int, Tuple[object, dict]] = {}
#: ports this process serves metrics on, per (addr, port) -> registry served there
_SERVING: Dict[Tuple[str, int], object] = {}
_PROM_LOCK = threading.Lock()


def _metrics(pc, registry) -> dict:
    reg = registry if registry is not None else pc.REGISTRY
    with _PROM_LOCK:
        got = _METRICS.get(id(reg))
        if got is not None and got[0] is reg:
            return got[1]
        kw = {"registry": reg}
        metrics = {
            "alarms": pc.Counter("steerkernel_alarms_total", "alarms fired",
                                 ["rule", "concept"], **kw),
            "requests": pc.Counter("steerkernel_requests_total", "requests monitored", **kw),
            "tokens": pc.Counter("steerkernel_request_tokens_total", "tokens monitored", **kw),
            "dropped": pc.Counter("steerkernel_dropped_tokens_total",
                                  "monitor samples dropped under overload", **kw),
            "concept_mean": pc.Gauge("steerkernel_concept_mean",
                                     "mean projection of the last finished request",
                                     ["concept"], **kw),
        }
        _METRICS[id(reg)] = (reg, metrics)
        return metrics


def _serve(pc, registry, port: int, addr: str) -> Optional[int]:
    """Serve ``registry`` on ``addr:port`` once per process; the port actually served, or
    None (logged once) when it is taken: metrics are never a reason to stop an engine."""
    reg = registry if registry is not None else pc.REGISTRY
    with _PROM_LOCK:
        if (addr, port) in _SERVING:
            have = _SERVING[(addr, port)]
            if have is None or have is reg:  # taken (already logged) / already served
                return None if have is None else port
            log.warning("steerkernel: Prometheus port %s:%d already serves another registry "
                        "in this process; these metrics are not exported there", addr, port)
            return None
        try:
            pc.start_http_server(port, addr=addr, registry=reg)
        except OSError as e:
            _SERVING[(addr, port)] = None  # warn once, not per sink / engine restart
            log.warning("steerkernel: cannot serve Prometheus metrics on %s:%d (%s); the "
                        "engine runs on without the metrics endpoint", addr, port, e)
            return None
        _SERVING[(addr, port)] = reg
        return port


class PrometheusSink:
    """Prometheus metrics (needs ``prometheus_client``).

    ``steerkernel_alarms_total{rule,concept}``, ``steerkernel_requests_total``,
    ``steerkernel_request_tokens_total``, ``steerkernel_dropped_tokens_total`` and
    ``steerkernel_concept_mean{concept}`` (mean projection of the last finished request at
    ``layer``).  Pass ``registry`` to keep metrics out of the global registry (tests).

    Several sinks in one process share the metrics of a registry (counts add up).  ``port``:
    serve the registry on ``127.0.0.1:port``; a port already in use is logged once and
    skipped (``self.port`` is then None), it never stops the caller.
    """

    def __init__(self, registry=None, layer: Optional[int] = None, port: Optional[int] = None,
                 addr: str = "127.0.0.1"):
        try:
            import prometheus_client as pc
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("PrometheusSink needs prometheus_client: "
                              "pip install prometheus_client") from e
        self.layer = layer
        m = _metrics(pc, registry)
        self.alarms, self.requests, self.tokens = m["alarms"], m["requests"], m["tokens"]
        self.dropped, self.concept_mean = m["dropped"], m["concept_mean"]
        self.port = _serve(pc, registry, port, addr) if port is not None else None

    def alarm(self, event) -> None:
        self.alarms.labels(rule=event.rule, concept=event.concept).inc()

    def request(self, report) -> None:
        self.requests.inc()
        self.tokens.inc(report.tokens)
        self.dropped.inc(report.dropped)
        li = report.layers.index(self.layer) if self.layer in report.layers else len(report.layers) // 2
        for name, v in zip(report.names, report.mean[li].tolist()):
            self.concept_mean.labels(concept=name).set(v)
