"""Tests of backgrounder_testing run pytest inside pytest (pytester)."""

from __future__ import annotations

pytest_plugins = ["pytester"]
