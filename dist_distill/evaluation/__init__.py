"""Evaluating models: metrics on held-out data (metrics) and the comparison table (report)."""
