"""Benchmarks: ``jointdiff bench quality`` / ``bench tune`` (print a table, write JSON)."""
