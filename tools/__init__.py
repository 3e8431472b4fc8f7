"""Benchmarks and dataset preparation (python -m tools.bench, python -m tools.prep_tiny)."""
