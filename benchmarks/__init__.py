"""steerkernel benchmarks: ``python -m benchmarks [--quick] [--device cpu|cuda] ...`` runs the
suite (see ``steerkernel/bench/``); ``python -m benchmarks report`` renders results."""
