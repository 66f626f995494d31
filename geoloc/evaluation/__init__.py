"""Scoring predictors on benchmarks: the resumable engine behind evaluate.py, the metrics, the figures
and the combined report."""
