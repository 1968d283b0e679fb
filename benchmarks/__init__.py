"""Benchmarks: scripts that print numbers and write reports to ``benchmarks/results/``.

Run them as modules from the repository root (``python -m benchmarks.compare``);
``python -m benchmarks.report`` turns ``compare.json`` into ``docs/benchmarks.md`` and the plots.
"""
