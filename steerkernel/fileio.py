"""Safe file reading and writing shared by the bank files, vector files, plots and reports.

* :func:`check_regular_file` -- refuse a directory, FIFO, socket or device before opening it
  (such a path could block or stream forever);
* :func:`read_text_input` -- the UTF-8 text of a regular file (or stdin) of at most
  :data:`MAX_TEXT_INPUT_BYTES`, opened without blocking and checked on the open descriptor;
* :func:`check_output_file` -- a path a command will append to: a regular file, a character
  device such as ``/dev/null``, or a new file in an existing directory (never a FIFO, which
  would block the open until a reader appears);
* :func:`atomic_write_bytes` -- temporary file in the same directory + ``os.replace``, so a
  reader sees either the old file or the complete new one;
* :func:`save_png` -- a matplotlib figure written atomically as a PNG.
"""
from __future__ import annotations

import io
import json
import os
import stat
import sys
import tempfile
from typing import Iterable, Iterator, Tuple, Type, Union

from .errors import BankFormatError, InputError

PathLike = Union[str, os.PathLike]

#: most bytes :func:`read_text_input` reads (a JSONL file to score, a corpus, a prompt)
MAX_TEXT_INPUT_BYTES = 64 << 20


def _check_mode(mode: int, path: str, what: str, error: Type[Exception]) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path!r} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path!r} is not a regular file (a FIFO, socket or device)")


def check_regular_file(path: str, what: str = "file",
                       error: Type[Exception] = BankFormatError) -> None:
    """Raise a clear error unless ``path`` is an existing regular file: ``FileNotFoundError``,
    ``IsADirectoryError``, or ``error`` (a FIFO, socket or device, a symlink loop, no
    permission), each naming ``what`` and the path."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except OSError as e:  # symlink loops, permissions
        raise error(f"{what} {path!r} cannot be opened: {e.strerror or e}") from None
    _check_mode(mode, path, what, error)


def read_text_input(path: str, what: str, limit: int = MAX_TEXT_INPUT_BYTES) -> str:
    """The UTF-8 text of ``path`` (``"-"``: stdin), at most ``limit`` bytes.

    A file is opened with ``O_NONBLOCK`` (so a FIFO cannot block the open) and must be a
    regular file, checked on the open descriptor (no race with a path swapped in between);
    stdin is read up to ``limit + 1`` bytes.  Raises ``FileNotFoundError``,
    ``IsADirectoryError`` or :class:`InputError` (not a regular file, too large, not UTF-8),
    each naming ``what`` and the path.
    """
    if path == "-":
        src = getattr(sys.stdin, "buffer", sys.stdin)  # tests may swap in a text stream
        data = src.read(limit + 1)
        path = "<stdin>"
    else:
        check_regular_file(path, what, InputError)  # the clearest message for a socket, ...
        try:  # ... and the open descriptor is checked again (the path may change meanwhile)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} {path!r} does not exist") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"{what} {path!r} is a directory, not a file") from None
        except OSError as e:  # permissions, symlink loops, a socket
            raise InputError(f"{what} {path!r} cannot be opened: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            _check_mode(os.fstat(fd).st_mode, path, what, InputError)
            data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{what} {path!r} is larger than the limit of {limit} bytes")
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path!r} is not UTF-8 text (bad byte at offset "
                         f"{e.start})") from None


def check_output_file(path: str, what: str) -> None:
    """Raise a clear error unless ``path`` can be opened for appending without blocking: an
    existing regular file or character device (``/dev/null``, a terminal), or a new file in
    an existing directory.  A FIFO (whose open blocks until a reader appears), socket,
    directory or block device is refused (:class:`InputError`, ``IsADirectoryError``)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{what}: directory {folder!r} does not exist") from None
        return
    except OSError as e:
        raise InputError(f"{what} {path!r} cannot be opened: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path!r} is a directory")
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        raise InputError(f"{what} {path!r} is a FIFO, socket or block device; give a regular "
                         "file")


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file (0o666 minus the umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + ``os.replace``,
    so readers see either the old file or the complete new one.  A symbolic link is written
    through (its target is replaced; the link stays), and anything that is not a regular file
    (a character device such as ``/dev/null``) is written in place, never replaced."""
    path = os.path.realpath(os.fspath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{path!r} is a directory")
        with open(path, "wb") as f:
            f.write(data)
        return
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"directory {folder!r} does not exist (writing {path!r})")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes it private; a plain open() would not
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_png(fig, path: PathLike) -> None:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG (130 dpi, tight), atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["MAX_TEXT_INPUT_BYTES", "check_regular_file", "read_text_input", "check_output_file",
           "default_file_mode", "atomic_write_bytes", "save_png", "text_lines"]


def text_lines(text: str) -> list:
    """The lines of ``text`` split at ``\n`` only (a trailing ``\r`` dropped): unlike
    ``str.splitlines`` it keeps U+2028, U+2029, U+0085 and the other Unicode line breaks, which
    are legal inside a JSON string and part of a prompt's text."""
    return [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]


def jsonl_records(lines: Iterable[str], where: str,
                  error: Type[Exception] = ValueError) -> Iterator[Tuple[int, object]]:
    """``(line number, parsed value)`` for every non-blank line of JSONL text; a line that is
    not JSON (or nested too deeply for the parser) raises ``error`` naming ``where`` and the
    line."""
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise error(f"{where} line {no}: not valid JSON ({why})") from None
        yield no, rec
