"""Shared by tests that open a gateway which must refuse to start: trio may
wrap the one error in ``ExceptionGroup``s (a nursery re-raises what its
tasks raised), so tests unwrap it before looking at it."""

from __future__ import annotations

from typing import TypeVar

from triogate.errors import ConfigError

__all__ = ["config_error", "sole_error"]

E = TypeVar("E", bound=BaseException)


def sole_error(exc: BaseException, kind: type[E]) -> E:
    """The one ``kind`` exception inside ``exc`` (itself, or alone in nested
    groups); fails the test on anything else."""
    while isinstance(exc, BaseExceptionGroup):
        assert len(exc.exceptions) == 1, exc.exceptions
        exc = exc.exceptions[0]
    assert isinstance(exc, kind), repr(exc)
    return exc


def config_error(exc: BaseException) -> ConfigError:
    """The ConfigError inside what opening the gateway raised."""
    return sole_error(exc, ConfigError)
