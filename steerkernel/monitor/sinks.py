"""Where monitor events go besides Python callbacks: a JSONL log and Prometheus metrics."""
from __future__ import annotations

import json
import os
import threading
from typing import Optional


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


class PrometheusSink:
    """Prometheus metrics (needs ``prometheus_client``).

    ``steerkernel_alarms_total{rule,concept}``, ``steerkernel_requests_total``,
    ``steerkernel_request_tokens_total``, ``steerkernel_dropped_tokens_total`` and
    ``steerkernel_concept_mean{concept}`` (mean projection of the last finished request at
    ``layer``).  Pass ``registry`` to keep metrics out of the global registry (tests).
    """

    def __init__(self, registry=None, layer: Optional[int] = None, port: Optional[int] = None):
        try:
            import prometheus_client as pc
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("PrometheusSink needs prometheus_client: "
                              "pip install prometheus_client") from e
        kw = {"registry": registry} if registry is not None else {}
        self.layer = layer
        self.alarms = pc.Counter("steerkernel_alarms_total", "alarms fired",
                                 ["rule", "concept"], **kw)
        self.requests = pc.Counter("steerkernel_requests_total", "requests monitored", **kw)
        self.tokens = pc.Counter("steerkernel_request_tokens_total", "tokens monitored", **kw)
        self.dropped = pc.Counter("steerkernel_dropped_tokens_total",
                                  "monitor samples dropped under overload", **kw)
        self.concept_mean = pc.Gauge("steerkernel_concept_mean",
                                     "mean projection of the last finished request",
                                     ["concept"], **kw)
        if port is not None:
            pc.start_http_server(port, addr="127.0.0.1", **kw)

    def alarm(self, event) -> None:
        self.alarms.labels(rule=event.rule, concept=event.concept).inc()

    def request(self, report) -> None:
        self.requests.inc()
        self.tokens.inc(report.tokens)
        self.dropped.inc(report.dropped)
        li = report.layers.index(self.layer) if self.layer in report.layers else len(report.layers) // 2
        for name, v in zip(report.names, report.mean[li].tolist()):
            self.concept_mean.labels(concept=name).set(v)
