"""Benchmarks: postwarden side by side with Postfix (``make bench``).

Run from the repository root as ``python -m bench.compare``; see
docs/performance.md for what is measured and how.
"""
