"""Benchmarks of issue #7: `python -m benchmarks` runs them all (see benchmarks/README.md)."""
