"""The access log (bounded queue, batched writes, drain at shutdown, JSON
lines without keys), the ``[log]`` section, and JSON application logs."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from triogate.config import LogConfig, parse_config
from triogate.telemetry.accesslog import AccessLog
from triogate.telemetry.logs import JsonFormatter, configure_logging
from triogate.telemetry.records import RequestRecord
from triogate.testing import FakeUpstream, harness_config, open_harness

FIELDS = [
    "at",
    "request_id",
    "method",
    "path",
    "route",
    "upstream",
    "status",
    "outcome",
    "key_id",
    "client_ip",
    "duration_ms",
    "upstream_ms",
    "retries",
]


def record(i: int = 1, **fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "at": 1_800_000_000.5,
        "request_id": f"req-{i}",
        "method": "GET",
        "path": f"/users/{i}",
        "route": "users",
        "upstream": "backend",
        "status": 200,
        "outcome": "ok",
        "key_id": "key_a",
        "client_ip": "10.0.0.1",
        "duration_seconds": 0.0125,
        "upstream_seconds": 0.01,
        "retries": 0,
    }
    base.update(fields)
    return RequestRecord(**base)


def lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [msgspec.json.decode(line) for line in text.splitlines()]


async def wait_until(done: Callable[[], bool]) -> None:
    """The writer works in a thread: poll (trio's clock cannot see it)."""
    with trio.fail_after(5):
        while True:
            if done():
                return
            await trio.sleep(0.005)


async def wait_written(log: AccessLog, count: int) -> None:
    await wait_until(lambda: log.written >= count)


# ---- the queue -----------------------------------------------------------------


async def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "access.log"), queue_size=3)
    for i in range(5):
        log.observe(record(i))  # never blocks, never raises
    s = log.statistics()
    assert (s.queued, s.dropped, s.written, s.capacity) == (3, 2, 0, 3)
    assert log.dropped == 2


async def test_lines_are_written_in_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    writes: list[int] = []
    real_write = log._write_sync

    def counting_write(data: bytearray) -> None:
        writes.append(len(data))
        real_write(data)

    log._write_sync = counting_write  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(50):  # all queued before the writer runs again
            log.observe(record(i))
        await wait_written(log, 50)
        nursery.cancel_scope.cancel()
    assert len(writes) == 1
    assert log.statistics().batches == 1
    got = lines(path)
    assert [line["request_id"] for line in got] == [f"req-{i}" for i in range(50)]
    assert sum(writes) == path.stat().st_size


async def test_a_line_has_every_field(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.observe(record(1, retries=2))
        log.observe(
            record(
                2,
                route=None,
                upstream=None,
                status=404,
                outcome="ROUTE_NOT_FOUND",
                key_id=None,
                upstream_seconds=None,
            )
        )
        await wait_written(log, 2)
        nursery.cancel_scope.cancel()
    first, second = lines(path)
    assert list(first) == FIELDS  # in this order
    assert first == {
        "at": "2027-01-15T08:00:00.500000Z",
        "request_id": "req-1",
        "method": "GET",
        "path": "/users/1",
        "route": "users",
        "upstream": "backend",
        "status": 200,
        "outcome": "ok",
        "key_id": "key_a",
        "client_ip": "10.0.0.1",
        "duration_ms": 12.5,
        "upstream_ms": 10.0,
        "retries": 2,
    }
    assert second["route"] is None and second["upstream"] is None
    assert second["key_id"] is None and second["upstream_ms"] is None
    assert second["outcome"] == "ROUTE_NOT_FOUND"


async def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text('{"earlier":true}\n')
    log = AccessLog(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.observe(record())
        await wait_written(log, 1)
        nursery.cancel_scope.cancel()
    assert [line.get("earlier", False) for line in lines(path)] == [True, False]


async def test_cancellation_drains_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(100):
            log.observe(record(i))
        nursery.cancel_scope.cancel()  # before the writer had a turn
    assert len(lines(path)) == 100
    s = log.statistics()
    assert (s.written, s.dropped, s.queued, s.running) == (100, 0, 0, False)
    log.observe(record())  # the writer is gone: counted, not queued
    assert log.dropped == 1


async def test_a_failing_write_drops_the_batch_and_keeps_going(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    real_write = log._write_sync
    failures = [OSError(28, "No space left on device")]

    def flaky_write(data: bytearray) -> None:
        if failures:
            raise failures.pop()
        real_write(data)

    log._write_sync = flaky_write  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.observe(record(1))
        log.observe(record(2))
        await wait_until(lambda: log.write_errors > 0)
        log.observe(record(3))
        await wait_written(log, 1)
        nursery.cancel_scope.cancel()
    assert [line["request_id"] for line in lines(path)] == ["req-3"]
    s = log.statistics()
    assert (s.written, s.dropped, s.write_errors) == (1, 2, 1)


async def test_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
    log = AccessLog("-")
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.observe(record(1))
        log.observe(record(2))
        await wait_written(log, 2)
        nursery.cancel_scope.cancel()
    got = [msgspec.json.decode(line) for line in raw.getvalue().splitlines()]
    assert [line["request_id"] for line in got] == ["req-1", "req-2"]


async def test_stdout_without_a_binary_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    log = AccessLog("-")
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.observe(record(1))
        await wait_written(log, 1)
        nursery.cancel_scope.cancel()
    assert msgspec.json.decode(out.getvalue())["request_id"] == "req-1"


# ---- the [log] section -----------------------------------------------------------


def test_log_section() -> None:
    assert LogConfig() == LogConfig("INFO", "text", "-", 10_000)
    config = parse_config(
        {"log": {"level": "DEBUG", "format": "json", "access_log": "/var/log/tg.jsonl"}},
        environ={},
    )
    assert config.log.format == "json"
    log = AccessLog.from_config(config.log)
    assert log is not None and log.destination == "/var/log/tg.jsonl"
    assert log.capacity == 10_000
    assert AccessLog.from_config(LogConfig(access_log="")) is None  # TOML has no null
    assert AccessLog.from_config(LogConfig(access_log=None)) is None
    env = parse_config({}, environ={"TRIOGATE_LOG__ACCESS_LOG_QUEUE": "5"})
    assert env.log.access_log_queue == 5


def test_log_section_is_validated() -> None:
    from triogate.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"log": {"level": "LOUD", "format": "xml", "access_log_queue": 0, "colour": 1}},
            environ={},
        )
    paths = {e.path for e in caught.value.errors}
    assert {"log.level", "log.format", "log.access_log_queue", "log.colour"} <= paths


def test_log_section_fields_are_documented() -> None:
    schema = msgspec.json.schema(LogConfig)
    props = schema["$defs"]["LogConfig"]["properties"]
    assert set(props) == set(LogConfig.__struct_fields__)
    assert all(p.get("description") for p in props.values()), props


# ---- JSON application logs -------------------------------------------------------


def test_json_formatter() -> None:
    formatter = JsonFormatter()
    logger = logging.getLogger("triogate.test")
    rec = logger.makeRecord(
        "triogate.test",
        logging.WARNING,
        __file__,
        1,
        "hello %s",
        ("world",),
        None,
        extra={"request_id": "req-9"},
    )
    rec.created = 1_800_000_000.25
    assert msgspec.json.decode(formatter.format(rec)) == {
        "ts": "2027-01-15T08:00:00.250Z",
        "level": "WARNING",
        "logger": "triogate.test",
        "message": "hello world",
        "request_id": "req-9",
    }
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logger.makeRecord(
            "triogate.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    doc = msgspec.json.decode(formatter.format(rec))
    assert "request_id" not in doc
    assert doc["exc"].startswith("Traceback") and "ValueError: boom" in doc["exc"]
    assert "\n" not in formatter.format(rec)  # one line, whatever the traceback


def test_configure_logging() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    try:
        configure_logging(LogConfig(level="WARNING", format="json"), stream=out)
        logging.getLogger("triogate.x").info("not shown")
        logging.getLogger("triogate.x").warning("shown", extra={"request_id": "r"})
        configure_logging(LogConfig(format="text"), level="ERROR", stream=out)
        logging.getLogger("triogate.x").warning("not shown either")
        logging.getLogger("triogate.x").error("plain")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = out.getvalue().splitlines()
    doc = msgspec.json.decode(first)
    assert (doc["level"], doc["message"], doc["request_id"]) == ("WARNING", "shown", "r")
    assert second.endswith("ERROR triogate.x: plain")


# ---- through the real gateway ---------------------------------------------------------


async def test_one_line_per_request_and_never_the_key(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    path = tmp_path / "access.log"
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        config = harness_config(
            tmp_path / "data",
            upstream.url,
            plugins={"key-auth": {}, "rate-limit": {"limit": 1, "period_seconds": 3600}},
            global_plugins={"request-id": {}},
        )
        config = msgspec.structs.replace(config, log=LogConfig(access_log=str(path)))
        sent: list[tuple[str, int, str | None]] = []
        async with open_harness(tmp_path, upstream=upstream, config=config) as h:
            key = await h.create_key()
            assert h.server.gateway is not None
            key_id = h.server.gateway.keys.list(limit=1, cursor=None).items[0].id
            cases = [
                ({"Authorization": f"Bearer {key}"}, 200, key_id),
                ({"X-API-Key": key, "X-Request-ID": "mine-1"}, 429, key_id),
                ({}, 401, None),
                ({"Authorization": f"Bearer {key[:-2]}xx"}, 401, None),
            ]
            for headers, status, expect_key in cases:
                r = await h.client.get("/some/path?q=1", headers=headers)
                assert r.status_code == status, r.text
                sent.append((r.headers["x-request-id"], status, expect_key))
        nursery.cancel_scope.cancel()
    # The server has stopped: the writer drained everything.
    text = path.read_text()
    assert key not in text and key[:12] not in text
    got = lines(path)
    assert [(line["request_id"], line["status"], line["key_id"]) for line in got] == sent
    assert sent[1][0] == "mine-1"
    assert [line["outcome"] for line in got] == ["ok", "RATE_LIMITED", "MISSING_KEY", "INVALID_KEY"]
    for line in got:
        assert list(line) == FIELDS
        assert line["path"] == "/some/path" and line["route"] == "test"
        assert line["method"] == "GET" and line["client_ip"] == "127.0.0.1"
        assert line["duration_ms"] >= 0
    assert got[0]["upstream_ms"] is not None and got[2]["upstream_ms"] is None
