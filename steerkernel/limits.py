"""Input limits and lexical pieces shared by the steering grammar (:mod:`steerkernel.steering`)
and the alarm rules (:mod:`steerkernel.monitor.alarms`); docs/security.md lists every bound."""
from __future__ import annotations

import re

#: largest layer index a program or a rule may name (exclusive)
MAX_LAYER = 100_000
#: characters of user input an error message quotes
QUOTE_CHARS = 80
#: a decimal number as programs and rules write it
NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
NUMBER_RE = re.compile(NUMBER)
#: a concept name as programs and rules write it: bare (no space, control or grammar
#: character) or in double quotes with ``\"`` and ``\\`` escaping a quote and a backslash
NAME_BARE = r'[^\s\x00-\x1f\x7f=<>@:?;,!"\\]+'
NAME_QUOTED = r'"(?:[^"\\]|\\.)*"'
NAME_BARE_RE = re.compile(NAME_BARE)
NAME_RE = re.compile(rf"{NAME_QUOTED}|{NAME_BARE}")


def unquote_name(text: str) -> str:
    """A concept as written (a match of :data:`NAME_RE`) -> the name."""
    if text.startswith('"'):
        return re.sub(r"\\(.)", r"\1", text[1:-1], flags=re.S)
    return text


def format_name(name: str) -> str:
    """The name as programs and rules write it: bare when it can be, else quoted."""
    if NAME_BARE_RE.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_input(value, limit: int = QUOTE_CHARS) -> str:
    """User input as error messages quote it: ``repr`` of its first ``limit`` characters
    (control characters escaped) and ``…(N chars)`` when it is longer."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}…({len(value)} chars)"
    text = repr(value)  # escapes the control characters of the strings it holds
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"
