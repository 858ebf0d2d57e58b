"""Benchmarks: run with `make bench` (or `make bench-quick`); results land in docs/benchmarks.md."""
