"""``header-stamp``: an example triogate plugin.

It stamps every response of a route with a header naming the route and the
API key that was used (``X-Gateway-Stamp: route=users; key=key_…`` by
default), so a client or a support engineer can see which gateway route and
which key a response came through. Optionally it refuses requests that lack a
given request header (``require_header``), before the upstream is called.

It uses two phases of the plugin contract:

* ``access`` checks the required header and refuses with a problem+json 400
  (``MISSING_HEADER``) by raising a ``GatewayError``;
* ``response`` sets the header. It runs for every response of the route: the
  upstream's, an early answer of another plugin, and the gateway's own errors
  (a refused key, the refusal above), so the stamp is always there.

Registered in this package's ``pyproject.toml``::

    [project.entry-points."triogate.plugins"]
    header-stamp = "triogate_header_stamp:HeaderStamp"
"""

from __future__ import annotations

import string
from typing import Annotated

import msgspec
from msgspec import Meta

from triogate.plugins import Context, GatewayError, Plugin, PluginEnv, Response

__all__ = ["HeaderStamp", "HeaderStampConfig", "MissingHeader"]

#: What the ``value`` template may use.
PLACEHOLDERS = ("route", "key_id", "request_id")

HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")]


class HeaderStampConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    header_name: Annotated[HeaderName, Meta(description="response header to set")] = (
        "X-Gateway-Stamp"
    )
    value: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=512,
            pattern=r"^[^\r\n\x00]*$",
            description="template of the header value; placeholders {route}, {key_id}, "
            "{request_id}",
        ),
    ] = "route={route}; key={key_id}"
    anonymous: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=64,
            pattern=r"^[^\r\n\x00]*$",
            description="stands for {key_id} when no key was checked, "
            "and for {route} when no route matched",
        ),
    ] = "-"
    require_header: Annotated[
        HeaderName | None,
        Meta(description="refuse requests without this request header (400 MISSING_HEADER)"),
    ] = None


class MissingHeader(GatewayError):
    """A plugin's own error: a ``GatewayError`` subclass with a status, a
    machine-readable code and a title becomes a problem+json answer."""

    status = 400
    code = "MISSING_HEADER"
    title = "Bad Request"


def _template_fields(template: str) -> list[str]:
    """The placeholders of ``template``; ValueError if it cannot be used."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # e.g. a lone "{"
        raise ValueError(f"value: {exc} (write '{{{{' for a literal brace)") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            raise ValueError(f"value: unknown placeholder {{{field}}} (use {known})")
        fields.append(field)
    return fields


class HeaderStamp(Plugin[HeaderStampConfig]):
    name = "header-stamp"
    # The transformation band (700-899): after authentication (1000-1399) in
    # the access phase. A route that wants the header checked before the key
    # says so with `before = ["key-auth"]`.
    priority = 850
    Config = HeaderStampConfig

    def __init__(self, config: HeaderStampConfig, env: PluginEnv) -> None:
        # One instance per route and config load: precompute here. A
        # ValueError (or TypeError) stops start-up with a message naming the
        # plugin and its config path.
        super().__init__(config, env)
        _template_fields(config.value)
        try:
            config.value.encode("latin-1")
            config.anonymous.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("value and anonymous must be Latin-1 text") from None
        self.required = (
            config.require_header.lower().encode("latin-1")
            if config.require_header is not None
            else None
        )

    async def access(self, ctx: Context) -> Response | None:
        if self.required is not None:
            value = ctx.request.headers.get_raw(self.required)
            if value is None or not value.strip():
                raise MissingHeader(f"this route needs the {self.config.require_header} header")
        return None  # go on: the next plugin, then the upstream

    async def response(self, ctx: Context, response: Response) -> None:
        anonymous = self.config.anonymous
        stamp = self.config.value.format_map(
            {
                "route": ctx.route.name if ctx.route is not None else anonymous,
                "key_id": ctx.consumer.id if ctx.consumer is not None else anonymous,
                "request_id": ctx.request_id,
            }
        )
        response.headers.set(self.config.header_name, stamp)
