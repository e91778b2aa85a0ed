"""Evaluation: per-item routing, NLL and answers (evaluate.py), every method on the same test items (suite.py),
answer scores (metrics.py), results.md / results.json (report.py) and figures (plots.py)."""
