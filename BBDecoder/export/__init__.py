"""Exporters that subscribe to analysis events (TensorBoard)."""
