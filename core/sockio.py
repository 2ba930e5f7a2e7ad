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
wait is cancellable: timeouts and shutdown work as usual.
"""

from __future__ import annotations

import errno
import socket

import trio

__all__ = ["close", "connect", "recv", "send_all", "still_open"]


async def send_all(sock: socket.socket, data: bytes | memoryview) -> bool:
    """Write everything; True if the task had to wait (it checkpointed)."""
    waited = False
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            waited = True
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]
    return waited


async def recv(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    """Up to ``size`` bytes (b"" at EOF), or None if ``deadline`` (trio time)
    passes first. Raises OSError on a reset."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            pass
        with trio.move_on_at(deadline):
            await trio.lowlevel.wait_readable(sock)
            continue
        return None


async def connect(host: str, port: int, seconds: float) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY, within
    ``seconds``. Raises OSError (refused, unreachable) or trio.TooSlowError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex((host, port))
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


def still_open(sock: socket.socket) -> bool:
    """An idle keep-alive connection has nothing to read: readable (EOF or
    unasked data) means the peer closed it or it is out of step."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
