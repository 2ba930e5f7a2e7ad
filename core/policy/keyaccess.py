"""What a route asks of an API key: the ``KeyRule`` key-auth is configured
with. A plain value, shared by the plugin (which builds it once per route),
the data plane's key service and the admin API's ``POST /keys/validate``,
whose refusals ``control.keyrules.access_decision`` decides.
"""

from __future__ import annotations

import msgspec

__all__ = ["PLAIN_RULE", "KeyRule"]


class KeyRule(msgspec.Struct, frozen=True, gc=False):
    """A route's requirements on a key.

    ``scopes``: every one of them must be granted; ``any_scopes``: at least
    one of them; ``deny_roles``: a key with any of these roles is refused;
    ``keyspace``: the only keyspace whose keys are accepted (None: any)."""

    scopes: tuple[str, ...] = ()
    any_scopes: tuple[str, ...] = ()
    deny_roles: frozenset[str] = frozenset()
    keyspace: str | None = None

    @property
    def plain(self) -> bool:
        """Only ``scopes``: what ``KeyValidator.check_nowait`` can decide."""
        return not self.any_scopes and not self.deny_roles and self.keyspace is None


#: No requirement beyond a usable key.
PLAIN_RULE = KeyRule()
