"""Embedding models: networks (mf, two_tower) and the Lightning training module."""
