"""Socket I/O for the data plane: non-blocking stdlib sockets, trio waits only
when the kernel says "not yet".

Why not ``trio.SocketStream``/``trio.socket``: each of their operations is a
full checkpoint (a trip through the scheduler) even when the kernel answers
at once, and a proxied request makes at least four of them (read the
request, write upstream, read the answer, write it back). On the data plane
that machinery cost as much as everything else together. Here an operation
tries the system call first and parks the task (``wait_readable`` /
``wait_writable``) only if it would block, which is when a checkpoint is due
anyway. The connection loops add an explicit checkpoint for a request that
never had to wait, so one busy client cannot starve the others, and every
wait is cancellable: shutdown works as usual.

Timeouts without a cancel scope per wait: entering and leaving a scope with
a deadline costs more here (~13 µs) than the wait itself, and a proxied
request waits twice. Instead a parked socket registers its deadline with the
run's *watchdog*, a system task that wakes every ``TICK`` seconds and wakes
every overdue socket with ``notify_closing`` (the waiter sees its deadline
passed and reports a timeout). Timeouts are therefore up to ``TICK`` late,
which is nothing next to their seconds-long values.
"""

from __future__ import annotations

import errno
import socket

import trio

__all__ = [
    "TICK",
    "close",
    "connect",
    "interrupt",
    "park",
    "recv",
    "send_all",
    "still_open",
    "wait_recv",
    "watched",
]

TICK = 0.05


class _Wait:
    __slots__ = ("deadline", "expired", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.expired = False


class _Watchdog:
    """Wakes parked sockets whose deadline has passed (one per trio run)."""

    def __init__(self) -> None:
        # The waits themselves (hashed by identity): no ``id()`` per wait.
        self.waiting: set[_Wait] = set()

    async def run(self) -> None:
        while True:
            await trio.sleep(TICK)
            if not self.waiting:
                continue
            now = trio.current_time()
            for wait in [w for w in self.waiting if w.deadline <= now]:
                wait.expired = True
                trio.lowlevel.notify_closing(wait.sock)


_watchdog: trio.lowlevel.RunVar[_Watchdog] = trio.lowlevel.RunVar("triogate_watchdog")


def _dog() -> _Watchdog:
    try:
        return _watchdog.get()
    except LookupError:
        dog = _Watchdog()
        _watchdog.set(dog)
        trio.lowlevel.spawn_system_task(dog.run, name="triogate socket watchdog")
        return dog


def watched() -> set[_Wait]:
    """The run's set of parked sockets' deadlines, for an object that lives
    in one run (a connection) to pass to ``wait_recv``: finding it per wait
    costs a ``RunVar`` lookup (~0.15 µs), twice per proxied request."""
    return _dog().waiting


async def park(sock: socket.socket, deadline: float | None, *, write: bool) -> bool:
    """Wait until ``sock`` is ready; False if ``deadline`` passed first.
    Raises trio.ClosedResourceError if someone else interrupted the wait."""
    if deadline is None:
        if write:
            await trio.lowlevel.wait_writable(sock)
        else:
            await trio.lowlevel.wait_readable(sock)
        return True
    waiting = _dog().waiting
    wait = _Wait(sock, deadline)
    waiting.add(wait)
    try:
        if write:
            await trio.lowlevel.wait_writable(sock)
        else:
            await trio.lowlevel.wait_readable(sock)
    except trio.ClosedResourceError:
        if wait.expired:
            return False
        raise
    finally:
        waiting.remove(wait)
    return True


async def send_all(
    sock: socket.socket, data: bytes | memoryview, stall_seconds: float | None = None
) -> bool:
    """Write everything; True if the task had to wait (it checkpointed).
    Raises TimeoutError if the peer reads nothing for ``stall_seconds``
    (the clock is only read when the kernel's buffer is full)."""
    # The common case first: the kernel takes it all at once (no view, no
    # slicing, no coroutine suspension).
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return False
    waited = False
    view = memoryview(data)[sent:]
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            waited = True
            deadline = None if stall_seconds is None else trio.current_time() + stall_seconds
            if not await park(sock, deadline, write=True):
                raise TimeoutError("the peer stopped reading") from None
            continue
        view = view[sent:]
    return waited


async def recv(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    """Up to ``size`` bytes (b"" at EOF), or None if ``deadline`` (trio time)
    passes first. Raises OSError on a reset, trio.ClosedResourceError when
    ``interrupt`` ended the wait."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return await wait_recv(sock, size, deadline)


async def wait_recv(
    sock: socket.socket, size: int, deadline: float, waiting: set[_Wait] | None = None
) -> bytes | None:
    """``recv`` for a caller whose own ``sock.recv`` just said "not yet":
    parks first (trying again at once would be a wasted system call on
    every wait), then reads. The park is inline: one coroutine layer less
    on the hot path's every wait. ``waiting``: the run's ``watched()``,
    when the caller keeps it."""
    if waiting is None:
        waiting = _dog().waiting
    wait = _Wait(sock, deadline)
    while True:
        waiting.add(wait)
        try:
            await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            if wait.expired:
                return None
            raise
        finally:
            waiting.remove(wait)
        try:
            return sock.recv(size)
        except BlockingIOError:
            pass  # woken without data (spurious): wait again


def interrupt(sock: socket.socket) -> None:
    """End a wait on ``sock`` now (shutdown closing an idle connection): the
    waiter gets trio.ClosedResourceError."""
    trio.lowlevel.notify_closing(sock)


async def connect(host: str, port: int, seconds: float) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY, within
    ``seconds``. Raises OSError (refused, unreachable) or trio.TooSlowError."""
    with trio.fail_after(seconds):
        # A name is resolved off the event loop (trio runs getaddrinfo in a
        # thread; an IP literal is answered at once without one).
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"no address for {host}")
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise OSError(code, errno.errorcode.get(code, "connect failed"))
        if code != 0:
            with trio.fail_after(seconds):
                await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, errno.errorcode.get(code, "connect failed"))
    except BaseException:
        sock.close()
        raise
    return sock


def close(sock: socket.socket) -> None:
    """Close, waking any task parked on this socket first (trio's rule)."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


_raw_recv = socket.socket.recv


def still_open(sock: socket.socket) -> bool:
    """An idle keep-alive connection has nothing to read: readable (EOF or
    unasked data) means the peer closed it or it is out of step."""
    try:
        # The descriptor's own recv, also under a TLS socket (which refuses
        # flags): raw bytes on an idle TLS connection are a close_notify or
        # an alert, so "readable" means the same there (or, rarely, a late
        # post-handshake message: the pool then opens a new connection,
        # which costs a handshake, never a wrong answer).
        _raw_recv(sock, 1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
