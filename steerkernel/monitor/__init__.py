"""Live monitoring: device score buffers, async host copies, aggregates, alarms, sinks."""
from .alarms import AlarmRule, parse_rules
from .engine import AlarmEvent, MonitorEngine, RequestReport
from .sinks import JSONLSink, PrometheusSink

__all__ = ["AlarmRule", "parse_rules", "AlarmEvent", "MonitorEngine", "RequestReport",
           "JSONLSink", "PrometheusSink"]
