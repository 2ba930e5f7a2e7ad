"""Client addresses as the rest of the gateway should see them.

A dual-stack listener (``[::]:port`` with IPV6_V6ONLY off) hands IPv4 peers
over as IPv4-mapped IPv6 addresses, ``::ffff:192.0.2.7``. Left that way,
ip-restriction rules written for IPv4 ranges stop matching (a deny for
``127.0.0.0/8`` lets ``::ffff:127.0.0.1`` through), rate limits keyed by IP
count the same client under two names, and ``X-Forwarded-For`` tells the
upstream a form it does not expect. Both front doors (the native listener at
accept time, the ASGI adapter from the scope's ``client``) pass the peer's
address through ``client_ip`` once, so everything after sees the IPv4 form.
"""

from __future__ import annotations

import ipaddress

__all__ = ["client_ip"]

_MAPPED_PREFIX = "::ffff:"


def client_ip(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address turned into plain IPv4
    (``::ffff:127.0.0.1`` -> ``127.0.0.1``); anything else unchanged.

    The hot path (an IPv4 peer on an IPv4 listener) is one string compare."""
    if not host.startswith("::") or host[:7].lower() != _MAPPED_PREFIX:
        return host
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host
