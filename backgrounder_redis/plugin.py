"""Hook implementations that make ``redis://`` URLs work for store= and queue=."""

from __future__ import annotations
