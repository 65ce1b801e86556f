"""A small JSON-Schema validator for the result files (no extra dependency).

Supports the subset ``benchmarks/results/schema.json`` uses: ``type`` (a name or a list),
``enum``, ``required``, ``properties``, ``additionalProperties`` (bool or schema), ``items``,
``minimum`` and ``pattern``.  The test suite checks it agrees with ``jsonschema`` when that is
installed.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Optional

from .cases import REPO_ROOT

#: where result files are written and read (next to their schema)
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
SCHEMA_PATH = os.path.join(RESULTS_DIR, "schema.json")

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def load_schema(path: str = SCHEMA_PATH) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def validate(value, schema: dict, where: str = "$") -> List[str]:
    """Every way ``value`` breaks ``schema``, as ``"<json path>: <problem>"`` strings."""
    errs: List[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{where}: expected {'/'.join(types)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        errs.append(f"{where}: {value} < minimum {schema['minimum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errs.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
    if isinstance(value, dict):
        for k in schema.get("required", []):
            if k not in value:
                errs.append(f"{where}: missing required {k!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += validate(v, props[k], f"{where}.{k}")
            elif extra is False:
                errs.append(f"{where}: unexpected property {k!r}")
            elif isinstance(extra, dict):
                errs += validate(v, extra, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errs += validate(v, schema["items"], f"{where}[{i}]")
    return errs
