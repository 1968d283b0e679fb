"""Benchmarks: scripts that print numbers and write reports to ``benchmarks/results/``.

Run them from the repository root as modules (``python -m benchmarks.compare``) or as scripts.
"""
