"""Partitioning benchmark (run.py); a package so mypy names it partition.run, not run."""
