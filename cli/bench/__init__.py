"""Benchmarks that run ours and a reference side by side in one run and print both and their ratio."""
