"""Mechanics shared by every analysis: the layer table, hooks, the model helpers, rank helpers."""
