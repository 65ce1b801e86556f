"""The junction op's arguments, defined once.

:data:`ARGS` lists them in the op's positional order; everything else is generated from it:
the torch schema every backend registers (:data:`SCHEMA`; csrc/ops.cpp spells the same text for
the C++ op and a test holds the two equal), the :class:`JunctionArgs` tuple callers build by
keyword, and the names the validation and the fake implementation loop over.  What each
argument means is docs/design.md §2; the shapes below use its ``T, d, K, P``.
"""
from __future__ import annotations

import collections
from typing import NamedTuple, Tuple


class Arg(NamedTuple):
    """One argument of the op: ``type`` is its torch schema type ("Tensor" or "float");
    ``optional`` ones may be None; ``mutated`` ones are written in place by the op."""

    name: str
    type: str
    shape: str
    optional: bool = False
    mutated: bool = False


ARGS: Tuple[Arg, ...] = (
    Arg("residual", "Tensor", "[T, d] fp32/bf16/fp16", mutated=True),
    Arg("V", "Tensor", "[K, d] fp32 or residual's; None: K = 0, no readout", optional=True),
    Arg("x", "Tensor", "[T, d] residual's dtype", optional=True),
    Arg("slot", "Tensor", "[T] int32; None: monitor only", optional=True),
    Arg("shift", "Tensor", "[P, K] fp32", optional=True),
    Arg("lo", "Tensor", "[P, K] fp32", optional=True),
    Arg("hi", "Tensor", "[P, K] fp32", optional=True),
    Arg("gate_concept", "Tensor", "[P] int32", optional=True),
    Arg("gate_threshold", "Tensor", "[P] fp32", optional=True),
    Arg("gate_above", "Tensor", "[P] bool", optional=True),
    Arg("latch", "Tensor", "[P] int32", optional=True, mutated=True),
    Arg("weight", "Tensor", "[d] fp32 or residual's", optional=True),
    Arg("eps", "float", "RMSNorm epsilon"),
    Arg("scores", "Tensor", "[T, K] fp32, any strides; given exactly when V is", optional=True,
        mutated=True),
    Arg("norms", "Tensor", "[T] fp32, any stride", mutated=True),
    Arg("out", "Tensor", "[T, d] residual's dtype; only with weight", optional=True,
        mutated=True),
)

NAMES: Tuple[str, ...] = tuple(a.name for a in ARGS)
TENSOR_NAMES: Tuple[str, ...] = tuple(a.name for a in ARGS if a.type == "Tensor")
#: the arguments the op writes (in place)
WRITTEN = frozenset(a.name for a in ARGS if a.mutated)


def _schema(args: Tuple[Arg, ...]) -> str:
    """``(Tensor(a!) residual, Tensor? V, ...) -> ()``: mutated tensors get alias sets a, b, ...
    in order; the op returns nothing (it writes the buffers it is given)."""
    parts, alias = [], iter("abcdefghijklmnopqrstuvwxyz")
    for a in args:
        t = a.type + (f"({next(alias)}!)" if a.mutated else "") + ("?" if a.optional else "")
        parts.append(f"{t} {a.name}")
    return "(" + ", ".join(parts) + ") -> ()"


#: The schema every junction op shares (``"junction" + SCHEMA`` is the C++ op's definition).
SCHEMA = _schema(ARGS)

#: Defaults of :class:`JunctionArgs`: None everywhere but ``residual`` (required) and ``eps``.
_DEFAULTS = {"eps": 1e-6}

JunctionArgs = collections.namedtuple(
    "JunctionArgs", NAMES, defaults=[_DEFAULTS.get(n) for n in NAMES[1:]])
JunctionArgs.__doc__ = (
    "The op's arguments in schema order, built by keyword (``JunctionArgs(residual=r, V=V, "
    "x=x, ...)``; missing ones are None, ``eps`` 1e-6) and passed positionally "
    "(``op(*args)``).  Generated from :data:`steerkernel.ops.args.ARGS`.")
