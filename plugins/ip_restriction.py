"""``ip-restriction``: allow or deny clients by address (CIDR lists).

Deny wins over allow; with an allow list, every address not on it is denied.
The address is the TCP peer's: behind another proxy, put this plugin on that
proxy instead (X-Forwarded-For is for the upstream's information, not trust).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import msgspec
from msgspec import Meta

from triogate.errors import Forbidden
from triogate.plugins.contract import Context, Plugin, PluginEnv, Response

__all__ = ["IpRestriction"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Cidrs = Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=1000)]


class IpRestrictionConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    allow: Annotated[Cidrs, Meta(description="CIDRs allowed (empty: everyone not denied)")] = []
    deny: Annotated[Cidrs, Meta(description="CIDRs denied; deny wins over allow")] = []


def _networks(cidrs: list[str], field: str) -> tuple[Network, ...]:
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ValueError(f"{field}: {cidr!r} is not an IP address or CIDR") from None
    return tuple(out)


class IpRestriction(Plugin[IpRestrictionConfig]):
    name = "ip-restriction"
    priority = 3000
    Config = IpRestrictionConfig

    def __init__(self, config: IpRestrictionConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        if not config.allow and not config.deny:
            raise ValueError("give allow or deny (or both)")
        self.allow = _networks(config.allow, "allow")
        self.deny = _networks(config.deny, "deny")
        self._cache: dict[str, bool] = {}

    def allowed(self, client_ip: str) -> bool:
        verdict = self._cache.get(client_ip)
        if verdict is None:
            try:
                address = ipaddress.ip_address(client_ip)
            except ValueError:
                return False
            if any(address in net for net in self.deny):
                verdict = False
            else:
                verdict = not self.allow or any(address in net for net in self.allow)
            if len(self._cache) < 65536:
                self._cache[client_ip] = verdict
        return verdict

    def access_nowait(self, ctx: Context) -> Response | None:
        if not self.allowed(ctx.client_ip):
            raise Forbidden("your IP address is not allowed here")
        return None
