"""``[admin]``: settings of the admin listener's own pages (the console,
``triogate.console``). In its own module so ``config`` stays readable; like
``config``, this is the shared base: it imports no layer.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["AdminConfig"]


class AdminConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """``[admin]``: the web console under ``/ui`` on the admin listener."""

    console: Annotated[
        bool, Meta(description="serve the web console under /ui (false: those paths are 404)")
    ] = True
    session_idle_seconds: Annotated[
        float, Meta(ge=60, le=86_400, description="a console session unused this long ends")
    ] = 1800.0
