"""Safe file reading and writing shared by the bank files, vector files, plots and reports.

* :func:`check_regular_file` -- refuse a directory, FIFO, socket or device before opening it
  (such a path could block or stream forever);
* :func:`atomic_write_bytes` -- temporary file in the same directory + ``os.replace``, so a
  reader sees either the old file or the complete new one;
* :func:`save_png` -- a matplotlib figure written atomically as a PNG.
"""
from __future__ import annotations

import io
import os
import stat
import tempfile
from typing import Union

from .errors import BankFormatError

PathLike = Union[str, os.PathLike]


def check_regular_file(path: str, what: str = "file") -> None:
    """Raise a clear error unless ``path`` is an existing regular file: ``FileNotFoundError``,
    ``IsADirectoryError``, or :class:`BankFormatError` (a FIFO, socket or device, a symlink
    loop, no permission), each naming ``what`` and the path."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except OSError as e:  # symlink loops, permissions
        raise BankFormatError(f"{what} {path!r} cannot be opened: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path!r} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise BankFormatError(f"{what} {path!r} is not a regular file (a FIFO, socket or "
                              "device)")


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file (0o666 minus the umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + ``os.replace``,
    so readers see either the old file or the complete new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
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


__all__ = ["check_regular_file", "default_file_mode", "atomic_write_bytes", "save_png"]
