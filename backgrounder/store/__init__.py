"""Job stores: the JobStore contract and the built-in SQLite store."""

from backgrounder.store.base import JobStore, Update
from backgrounder.store.sqlite import SqliteStore

__all__ = ["JobStore", "SqliteStore", "Update"]
