"""``steerkernel`` command-line entry point.

Each sub-command lives in its own module ``steerkernel/cli/<name>.py`` defining
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their
command runs, so ``steerkernel --help`` and ``steerkernel doctor`` stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from ..errors import SteerkernelError
from ._common import printable

#: command -> one-line help.  Order is the order ``--help`` shows.
COMMANDS = {
    "demo": "run the built-in emotion monitoring + steering demo on the default model",
    "extract": "extract a concept bank from a model and a corpus",
    "score": "score texts against a concept bank (mean projection per concept)",
    "space": "concept-space geometry per layer: PC1/PC2 vs valence/arousal, with CIs",
    "monitor": "stream a generation with a live per-token table of the top concepts",
    "generate": "generate text with optional steering (--steer calm=+0.05)",
    "eval": "dose-response of steering: independent judge, coherence cost, monitor reading",
    "calibrate": "find each concept's recommended steering strength and store it in the bank",
    "probe": "behavioural A/B probe: p(harmful choice) under steering, with CIs",
    "bench": "run the benchmark suite",
    "doctor": "show which backends, extensions and models are available here",
}


#: longest error message printed (the rest is cut, so a huge input cannot flood the terminal)
MAX_ERROR_CHARS = 2000


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (``steerkernel <cmd>: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message, MAX_ERROR_CHARS)} (see "
                     f"'{self.prog} --help')\n")


def _module(name: str):
    return importlib.import_module(f"steerkernel.cli.{name}")


def build_parser(argv: List[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="steerkernel",
        description="Monitor and steer LLMs along concept directions in the residual stream.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"steerkernel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen command's module is imported (its arguments are needed to parse).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _module(name).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_module(args.command).run(args) or 0)
    except (SteerkernelError, ValueError, TypeError, KeyError, OSError, OverflowError) as e:
        # OSError: missing / unreadable files, a full disk (ENOSPC), a closed pipe
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"steerkernel {args.command}: error: {printable(msg, MAX_ERROR_CHARS)}",
              file=sys.stderr)
        return 2
    except RecursionError:
        print(f"steerkernel {args.command}: error: input nested too deeply", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"steerkernel {args.command}: error: out of memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
