"""The cluster's records, sans-IO: which tables are shared, the recording
transaction, applying changes in order, rebuilding (MemoryStore, no Redis)."""

from __future__ import annotations

from functools import partial

import pytest

from triogate.cluster.replica import (
    NODE_KEY,
    POSITION_KEY,
    Gap,
    Position,
    apply_change,
    apply_own,
    export_replicated,
    has_replicated_records,
    read_position,
    rebuild,
    run_recorded,
    write_position,
)
from triogate.cluster.status import ReplicaState, ReplicaStatus
from triogate.cluster.tables import (
    LOCAL_TABLES,
    REPLICATED_TABLES,
    Change,
    decode_change,
    encode_change,
    is_replicated,
)
from triogate.errors import Conflict
from triogate.storage import MemoryStore, Table, WriteTxn


def test_every_table_is_classified_once() -> None:
    # A table added to storage.base.Table must be declared shared or local
    # in cluster/tables.py on purpose.
    assert REPLICATED_TABLES.isdisjoint(LOCAL_TABLES)
    assert set(Table) == REPLICATED_TABLES | LOCAL_TABLES


def test_meta_is_shared_except_the_nodes_own_keys() -> None:
    assert is_replicated(Table.META, b"setup")
    assert not is_replicated(Table.META, b"datadir")
    assert not is_replicated(Table.META, POSITION_KEY)
    assert not is_replicated(Table.META, NODE_KEY)
    assert not is_replicated(Table.USAGE, b"key_1")
    assert is_replicated(Table.KEYS, b"key_1")


def test_change_round_trip_skips_what_this_node_cannot_apply() -> None:
    raw = encode_change("n1", 12.5, [(Table.KEYS, b"k", b"v"), (Table.KEY_DIGESTS, b"d", None)])
    change = decode_change(raw)
    assert change.node == "n1" and change.at == 12.5
    assert list(change.applicable()) == [(Table.KEYS, b"k", b"v"), (Table.KEY_DIGESTS, b"d", None)]
    # A newer node's table, and a key local to each node: skipped.
    odd = Change("n2", 1.0, [(b"tomorrow", b"x", b"y"), (b"meta", b"datadir", b"z")])
    assert list(odd.applicable()) == []


async def test_a_shared_write_is_recorded_and_undone() -> None:
    store = MemoryStore()
    await store.write(lambda txn: txn.put(Table.KEYS, b"old", b"1"))

    def fn(txn: WriteTxn) -> str:
        txn.put(Table.KEYS, b"new", b"2")
        # The function sees its own writes, as on a single node.
        assert txn.get(Table.KEYS, b"new") == b"2"
        txn.delete(Table.KEYS, b"old")
        txn.put(Table.USAGE, b"new", b"u")
        return "done"

    recorded = await store.write(partial(run_recorded, fn))
    assert recorded.result == "done"
    assert recorded.shared == [(Table.KEYS, b"new", b"2"), (Table.KEYS, b"old", None)]
    assert recorded.local == [(Table.USAGE, b"new", b"u")]
    assert recorded.position is None
    with store.read() as txn:  # nothing visible before Redis accepts it
        assert txn.get(Table.KEYS, b"old") == b"1"
        assert txn.get(Table.KEYS, b"new") is None
        assert txn.get(Table.USAGE, b"new") is None


async def test_a_local_only_write_is_kept() -> None:
    store = MemoryStore()
    recorded = await store.write(
        partial(run_recorded, lambda txn: txn.put(Table.USAGE, b"k", b"u"))
    )
    assert recorded.shared == [] and recorded.local == []
    with store.read() as txn:
        assert txn.get(Table.USAGE, b"k") == b"u"


async def test_an_error_in_the_function_propagates_and_writes_nothing() -> None:
    store = MemoryStore()

    def fn(txn: WriteTxn) -> None:
        txn.put(Table.KEYS, b"k", b"v")
        raise Conflict("no")

    with pytest.raises(Conflict):
        await store.write(partial(run_recorded, fn))
    with store.read() as txn:
        assert txn.get(Table.KEYS, b"k") is None


async def test_the_position_is_read_with_the_write() -> None:
    store = MemoryStore()
    await store.write(partial(write_position, position=Position("c1", 7, b"7-0")))
    recorded = await store.write(
        partial(run_recorded, lambda txn: txn.put(Table.ADMINS, b"a", b"x"))
    )
    assert recorded.position == Position("c1", 7, b"7-0")


def _change(*mutations: tuple[Table, bytes, bytes | None]) -> Change:
    return decode_change(encode_change("n", 0.0, list(mutations)))


async def test_changes_apply_in_order_once() -> None:
    store = MemoryStore()
    one = _change((Table.KEYS, b"a", b"1"))
    two = _change((Table.KEYS, b"a", None), (Table.KEYS, b"b", b"2"))
    assert await store.write(lambda t: apply_change(t, "c", 1, b"1-0", one))
    assert not await store.write(lambda t: apply_change(t, "c", 1, b"1-0", one))  # again: no-op
    assert await store.write(lambda t: apply_change(t, "c", 2, b"2-0", two))
    with store.read() as txn:
        assert txn.get(Table.KEYS, b"a") is None
        assert txn.get(Table.KEYS, b"b") == b"2"
        assert read_position(txn) == Position("c", 2, b"2-0")


async def test_a_gap_or_another_cluster_is_refused() -> None:
    store = MemoryStore()
    change = _change((Table.KEYS, b"a", b"1"))
    with pytest.raises(Gap):
        await store.write(lambda t: apply_change(t, "c", 3, b"3-0", change))
    await store.write(lambda t: apply_change(t, "c", 1, b"1-0", change))
    with pytest.raises(Gap):
        await store.write(lambda t: apply_change(t, "other", 2, b"2-0", change))
    with store.read() as txn:
        assert read_position(txn) == Position("c", 1, b"1-0")


async def test_own_write_applies_once_whoever_comes_first() -> None:
    store = MemoryStore()
    shared = [(Table.KEYS, b"a", b"1")]
    local = [(Table.USAGE, b"a", None)]
    await store.write(lambda t: t.put(Table.USAGE, b"a", b"u"))
    # The follower got there first: only the local mutations are left.
    await store.write(lambda t: apply_change(t, "c", 1, b"1-0", _change(*shared)))
    await store.write(lambda t: t.put(Table.KEYS, b"a", b"changed-since"))
    await store.write(lambda t: apply_own(t, "c", 1, b"1-0", shared, local))
    with store.read() as txn:
        assert txn.get(Table.KEYS, b"a") == b"changed-since"
        assert txn.get(Table.USAGE, b"a") is None
    # Next in line: applied, position moved.
    await store.write(lambda t: apply_own(t, "c", 2, b"2-0", [(Table.KEYS, b"b", b"2")], []))
    with store.read() as txn:
        assert txn.get(Table.KEYS, b"b") == b"2"
        assert read_position(txn) == Position("c", 2, b"2-0")


async def test_rebuild_replaces_shared_records_and_keeps_local_ones() -> None:
    store = MemoryStore()

    def fill(txn: WriteTxn) -> None:
        txn.put(Table.KEYS, b"stale", b"x")
        txn.put(Table.META, b"datadir", b"marker")
        txn.put(Table.META, b"setup", b"old-admin")
        txn.put(Table.USAGE, b"k", b"u")

    await store.write(fill)
    with store.read() as txn:
        assert has_replicated_records(txn)
        assert sorted(export_replicated(txn), key=lambda r: (r[0].value, r[1])) == [
            (Table.KEYS, b"stale", b"x"),
            (Table.META, b"setup", b"old-admin"),
        ]
    snapshot = {Table.KEYS: {b"fresh": b"y"}, Table.META: {b"setup": b"adm", b"datadir": b"no"}}
    written = await store.write(lambda t: rebuild(t, Position("c", 5, b"5-0"), snapshot))
    assert written == 2
    with store.read() as txn:
        assert txn.get(Table.KEYS, b"stale") is None
        assert txn.get(Table.KEYS, b"fresh") == b"y"
        assert txn.get(Table.META, b"setup") == b"adm"
        assert txn.get(Table.META, b"datadir") == b"marker"  # the node's own
        assert txn.get(Table.USAGE, b"k") == b"u"
        assert read_position(txn) == Position("c", 5, b"5-0")


def test_status_counts_lag_in_entries_and_seconds() -> None:
    now = [100.0]
    status = ReplicaStatus("n1", lambda: now[0])
    status.joined("c", 3)
    assert status.lag_entries == 0 and status.lag_seconds == 0.0
    status.saw_head(5)
    now[0] = 100.5
    assert status.lag_entries == 2 and status.lag_seconds == 0.5
    status.applied(5)
    assert status.lag_entries == 0 and status.lag_seconds == 0.0
    status.state = ReplicaState.READY
    status.failed(OSError("refused"))
    health = status.health()
    assert health.state == "detached" and not health.in_cluster and not health.connected
    assert health.errors == 1 and health.last_error == "OSError: refused"
    status.reached(0.002)
    assert status.health().redis_rtt_seconds == 0.002
