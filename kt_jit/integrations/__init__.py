"""Bridges to model libraries (each imports nothing from its library until used)."""
