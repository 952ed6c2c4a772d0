"""Benchmark scripts, run from the repository root as modules: ``python -m benchmarks.<name>``
(``python -m benchmarks.run_all`` for the whole suite, which ``make bench`` runs)."""
