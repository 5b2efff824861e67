"""Benchmarks of prefkd (see docs/benchmarks.md): every figure is a ratio measured side by side in one run."""
