"""The dependency ranges steerkernel supports, read from their one source, pyproject.toml.

An installed steerkernel (wheel or editable) reads them from its package metadata; a bare
source checkout on ``sys.path`` reads the ``pyproject.toml`` next to the package.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
from typing import Dict

_PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "pyproject.toml")
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)")
_cache: Dict[str, str] = {}


def _requirement_lines():
    try:
        return md.requires("steerkernel") or []
    except md.PackageNotFoundError:
        pass
    try:
        with open(_PYPROJECT, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    return re.findall(r'"([A-Za-z0-9_.\-]+\s*[<>=!~][^"]*)"', text)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def supported_range(package: str) -> str:
    """The version specifier steerkernel declares for ``package`` (e.g. ``">=5,<5.20"``), or
    ``""`` when it declares none."""
    key = _norm(package)
    if key not in _cache:
        spec = ""
        for line in _requirement_lines():
            m = _REQ.match(line)
            if m and _norm(m.group(1)) == key:
                spec = ",".join(sorted(p.strip() for p in m.group(2).split(",") if p.strip()))
                break
        _cache[key] = spec
    return _cache[key]


def is_supported(package: str, version: str) -> bool:
    """Whether ``version`` of ``package`` lies in :func:`supported_range` (True if no range)."""
    spec = supported_range(package)
    if not spec:
        return True
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(spec)
    except InvalidVersion:
        return False
