"""steerkernel's benchmark suite: one runner over a registry of cases, with roofline accounting.

* :mod:`.cases`    the registry: junction shapes, end-to-end decode hooks, and every
                   implementation measured side by side (kernel, unfused chains, floors).
* :mod:`.roofline` bytes moved / FLOPs per call; copy bandwidth measured in the same run.
* :mod:`.timing`   CPU wall-clock timer; CUDA events and CUDA-graph replay on GPU.
* :mod:`.runner`   ``python -m benchmarks`` / ``steerkernel bench``: runs cases, writes JSON.
* :mod:`.report`   ``python -m benchmarks report``: JSON -> Markdown tables + PNG plots.
* :mod:`.schema`   a small validator for ``benchmarks/results/schema.json``.
"""
