"""Integrations with other training frameworks (each imports its framework only in its module)."""

__all__: list[str] = []
