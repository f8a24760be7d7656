"""The pytest plugin of backgrounder_testing (registered through pytest11)."""

from __future__ import annotations
