"""Exceptions steerkernel raises on bad input; every message names the problem."""


class SteerkernelError(Exception):
    """Base class of steerkernel's own errors."""


class BankFormatError(SteerkernelError, ValueError):
    """A concept-bank file is malformed, truncated, corrupted or claims absurd sizes."""


class BankMismatchError(SteerkernelError, ValueError):
    """A concept bank does not fit the model it is being used with."""


class UnknownConceptError(SteerkernelError, KeyError):
    """A concept name is not in the bank."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SpecError(SteerkernelError, ValueError):
    """A steering program or monitor rule is malformed (bad value, unknown field, NaN...)."""


class UnsupportedModelError(SteerkernelError, ValueError):
    """The model (or the installed transformers version) is not supported."""


class InputError(SteerkernelError, ValueError):
    """An input or output path is unusable: not a regular file (a FIFO, socket or device that
    could block or stream forever), larger than its documented limit, or not UTF-8 text."""
