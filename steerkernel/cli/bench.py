"""``steerkernel bench``: run the benchmark suite (same runner as ``python -m benchmarks``)."""
from __future__ import annotations


def add_arguments(p) -> None:
    from ..bench.runner import add_arguments as add

    add(p)


def run(args) -> int:
    import sys

    from ..bench.runner import reexec_with_allocator_env, run as run_bench

    if not args.system_allocator:
        reexec_with_allocator_env(sys.argv[1:])
    return run_bench(args)
