"""Offline evaluation: full-ranking metrics, baselines, and the offline report (report.json/.md/.html)."""
