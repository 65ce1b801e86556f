"""``python -m benchmarks [run options]`` runs the suite; ``python -m benchmarks report [FILES]``
renders result files as Markdown + PNG (and benchmarks/results/README_table.md)."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv=None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from steerkernel.bench.report import main as report

        return report(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    from steerkernel.bench.runner import main as run, reexec_with_allocator_env

    if from_command_line:
        reexec_with_allocator_env(argv)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
