"""Unified-Bench scoring: one scorer interface (scorers.py) and folder scoring (folder.py)."""
