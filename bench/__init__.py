"""Benchmarks for guardproxy. Run ``python -m bench.overhead --help``.

Everything here binds and targets 127.0.0.1 only, and every load loop is bounded in both
request count and wall time.
"""
