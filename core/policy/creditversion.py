"""Credits versions: which of two balances of one subject is newer.

A balance counts from a *source*: a key's (or identity's) own credits, or
a plan's (``control.keyresolve.plan_credits_version``). A version's low 32
bits count the source's changes of its credits; the bits above name the
source (0 for a record's own credits). Versions are ordered only within one
source: a balance moved to another source resets to that source's, whichever
number is larger. The shared table (``dataplane.sharedlimits``) and the flush
(``dataplane.usageflush``) both ignore an older version of the same source.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SOURCE_SHIFT", "older_credits"]

#: Bits of a credits version that count changes; the bits above name the source.
SOURCE_SHIFT: Final = 32


def older_credits(version: int, than: int) -> bool:
    """Whether credits ``version`` is an earlier change of the same source
    as ``than`` (of two sources neither is older)."""
    return version < than and version >> SOURCE_SHIFT == than >> SOURCE_SHIFT
