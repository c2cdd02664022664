"""Utilities: atomic file writes and the Cerebras ModelZoo backend."""

__all__: list[str] = []
