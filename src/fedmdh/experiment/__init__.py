"""Experiments: training runs and benchmarks over algorithms and seeds, with their files."""
