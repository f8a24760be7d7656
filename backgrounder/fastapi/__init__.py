"""The FastAPI integration: setup_backgrounder and the router factory."""

from __future__ import annotations

__all__: list[str] = []
