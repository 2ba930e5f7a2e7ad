"""The access log: one JSON line per request, off the request path.

Every request has its line: answered ones, abandoned ones (the client left
first: status 499, outcome ``client_closed``) and the ones the listener
refused by itself before routing (400, 408, 413, 431, with their code).

``observe`` (a telemetry observer) only puts the ``RequestRecord`` into a
bounded trio memory channel: no encoding, no I/O, never a wait. When the
channel is full (the disk or the terminal cannot keep up) the record is
dropped and counted (``dropped``, exported as
``triogate_access_log_dropped_total``); a slow log must never slow requests.

``run`` is the writer task. It takes everything queued at once, encodes each
record with one reused msgspec encoder into one buffer, and hands the batch
to a worker thread for a single ``write`` and a flush (stdout or a file
opened for appending: one ``write`` of whole lines per batch keeps lines from
several worker processes from interleaving). On cancellation it drains what
is still queued, shielded, within ``DRAIN_SECONDS``.

Lines never contain the key, only its id::

    {"at":"2024-05-01T12:00:00.123456Z","request_id":"...","method":"GET",
     "path":"/v1/users/7","route":"users","upstream":"users","status":200,
     "outcome":"ok","key_id":"key_...","client_ip":"10.0.0.7",
     "duration_ms":1.234,"upstream_ms":0.987,"retries":0}
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import BinaryIO

import msgspec
import trio

from triogate.config import LogConfig
from triogate.telemetry.records import RequestRecord

__all__ = ["DRAIN_SECONDS", "AccessLine", "AccessLog", "AccessLogStatistics"]

log = logging.getLogger("triogate.telemetry.accesslog")

# At shutdown the queue is written out within this long, then abandoned.
DRAIN_SECONDS = 5.0
# Records per write: bounds one batch's memory when the queue is large.
MAX_BATCH = 4096


class AccessLine(msgspec.Struct, gc=False):
    """One line of the access log (the field order is the line's)."""

    at: datetime  # RFC 3339, UTC
    request_id: str
    method: str
    path: str
    route: str | None
    upstream: str | None
    status: int
    outcome: str
    key_id: str | None
    client_ip: str
    duration_ms: float
    upstream_ms: float | None
    retries: int

    @classmethod
    def of(cls, record: RequestRecord) -> AccessLine:
        upstream = record.upstream_seconds
        return cls(
            at=datetime.fromtimestamp(record.at, UTC),
            request_id=record.request_id,
            method=record.method,
            path=record.path,
            route=record.route,
            upstream=record.upstream,
            status=record.status,
            outcome=record.outcome,
            key_id=record.key_id,
            client_ip=record.client_ip,
            duration_ms=round(record.duration_seconds * 1000, 3),
            upstream_ms=round(upstream * 1000, 3) if upstream is not None else None,
            retries=record.retries,
        )


class AccessLogStatistics(msgspec.Struct, frozen=True):
    destination: str
    capacity: int
    queued: int
    written: int
    dropped: int
    batches: int
    write_errors: int
    running: bool


class AccessLog:
    """Access log lines to ``destination``: ``"-"`` for stdout, else a file
    path (appended to). ``queue_size`` records may wait; more are dropped."""

    def __init__(self, destination: str, *, queue_size: int = 10_000) -> None:
        if not destination:
            raise ValueError("an access log needs a destination")
        self.destination = destination
        self.capacity = queue_size
        self._send, self._receive = trio.open_memory_channel[RequestRecord](queue_size)
        self._encoder = msgspec.json.Encoder()
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self.dropped = 0
        self.written = 0
        self.batches = 0
        self.write_errors = 0
        self.running = False

    @classmethod
    def from_config(cls, config: LogConfig) -> AccessLog | None:
        """The access log ``[log]`` asks for; None when it is turned off."""
        destination = config.access_log_destination
        if destination is None:
            return None
        return cls(destination, queue_size=config.access_log_queue)

    def __repr__(self) -> str:
        queued = self._send.statistics().current_buffer_used
        return (
            f"<AccessLog {self.destination} {queued}/{self.capacity} queued, "
            f"{self.written} written, {self.dropped} dropped>"
        )

    def statistics(self) -> AccessLogStatistics:
        return AccessLogStatistics(
            destination=self.destination,
            capacity=self.capacity,
            queued=self._send.statistics().current_buffer_used,
            written=self.written,
            dropped=self.dropped,
            batches=self.batches,
            write_errors=self.write_errors,
            running=self.running,
        )

    # ---- the observer: on the request path, so cheap and never blocking -------

    def observe(self, record: RequestRecord) -> None:
        try:
            self._send.send_nowait(record)
        except (trio.WouldBlock, trio.BrokenResourceError):
            # Full, or the writer has stopped (shutdown): the line is lost.
            self.dropped += 1

    # ---- the writer task --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued records until cancelled, then drain the queue
        (shielded, at most ``DRAIN_SECONDS``) and close the file."""
        if self.destination != "-":
            # Opening may block (a network filesystem): not on the event loop.
            self._file = await trio.to_thread.run_sync(open, self.destination, "ab")
        self.running = True
        task_status.started()
        try:
            while True:
                first = await self._receive.receive()
                # Taken records are written even if we are cancelled now
                # (the thread cannot be interrupted anyway): none are lost
                # between the queue and the drain.
                with trio.CancelScope(shield=True):
                    await self._write(*self._take(first))
        finally:
            self.running = False
            with trio.CancelScope(shield=True) as drain:
                drain.deadline = trio.current_time() + DRAIN_SECONDS
                await self._drain()
            if drain.cancelled_caught:
                log.warning("access log: drain timed out; queued lines were lost")
            self._receive.close()  # later observe() calls count as dropped
            if self._file is not None:
                self._file.close()
                self._file = None

    async def _drain(self) -> None:
        while True:
            try:
                first = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            await self._write(*self._take(first))

    def _take(self, first: RequestRecord) -> tuple[bytearray, int]:
        """``first`` and whatever else is queued (up to ``MAX_BATCH``), as
        JSON lines in one reused buffer, and how many."""
        buf = self._buffer
        buf.clear()
        encoder = self._encoder
        record = first
        count = 0
        while True:
            encoder.encode_into(AccessLine.of(record), buf, -1)
            buf += b"\n"
            count += 1
            if count >= MAX_BATCH:
                break
            try:
                record = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
        return buf, count

    async def _write(self, data: bytearray, count: int) -> None:
        # ``data`` is the reused buffer: the next batch is only taken once
        # this write (thread included) has finished.
        try:
            # A thread even for stdout: a terminal or pipe that stops reading
            # would otherwise freeze the whole event loop.
            await trio.to_thread.run_sync(self._write_sync, data)
        except OSError as exc:
            self.write_errors += 1
            self.dropped += count
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                log.error(
                    "access log: cannot write to %s (%s); %d lines dropped so far",
                    self.destination,
                    exc,
                    self.dropped,
                )
            return
        self.written += count
        self.batches += 1

    def _write_sync(self, data: bytearray) -> None:
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
            return
        stream = sys.stdout  # looked up each time: tests and tools replace it
        if stream is None:
            return
        raw = getattr(stream, "buffer", None)
        if raw is None:
            stream.write(data.decode())
            stream.flush()
            return
        stream.flush()  # whatever was print()ed goes first
        raw.write(data)
        raw.flush()
