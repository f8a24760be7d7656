"""The FastAPI integration: setup_backgrounder and the router factory."""

from __future__ import annotations

from backgrounder.fastapi.lifecycle import setup_backgrounder
from backgrounder.fastapi.router import create_router, get_manager

__all__ = ["create_router", "get_manager", "setup_backgrounder"]
