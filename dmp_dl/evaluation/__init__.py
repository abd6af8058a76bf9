"""Offline evaluation: full-ranking metrics, baselines."""
