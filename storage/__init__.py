"""Storage for triogate: an ordered, transactional key-value store with named
tables (LMDB on disk, or in memory for unit tests) and the persisted records."""

from .base import ReadTxn, Store, StoreStatistics, Table, WriteTxn
from .lmdb_store import LmdbStore, open_lmdb_store
from .memory import MemoryStore
from .records import (
    KEY_STATUSES,
    AdminRecord,
    AuditRecord,
    Credits,
    KeyRecord,
    RateLimit,
    UsageRecord,
    codec,
)

__all__ = [
    "KEY_STATUSES",
    "AdminRecord",
    "AuditRecord",
    "Credits",
    "KeyRecord",
    "LmdbStore",
    "MemoryStore",
    "RateLimit",
    "ReadTxn",
    "Store",
    "StoreStatistics",
    "Table",
    "UsageRecord",
    "WriteTxn",
    "codec",
    "open_lmdb_store",
]
