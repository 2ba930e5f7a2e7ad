"""``request-transformer`` and ``response-transformer``: change headers,
query parameters, the upstream path and (when asked for) JSON body fields.

Operations run in Kong's order: remove, rename, replace (only if present),
add (only if absent), append (always). Header and query edits stream; JSON
body edits buffer the body, so they are opt-in per route and capped by
``max_body_bytes`` (413 for a request over it, 502 for a response).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlencode

import msgspec
from msgspec import Meta

from triogate.errors import InternalError, PayloadTooLarge, ValidationError
from triogate.http import Headers, body_from_bytes
from triogate.plugins.contract import Context, Plugin, PluginEnv, Response

__all__ = ["RequestTransformer", "ResponseTransformer"]

HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")]
HeaderValue = Annotated[str, Meta(max_length=8192, pattern=r"^[^\r\n\x00]*$")]
FieldName = Annotated[str, Meta(min_length=1, max_length=256)]
MAX_BODY = 1 << 20


class _HeaderOps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    remove_headers: Annotated[list[HeaderName], Meta(description="headers to drop")] = []
    rename_headers: Annotated[
        dict[HeaderName, HeaderName], Meta(description="old name -> new name")
    ] = {}
    replace_headers: Annotated[
        dict[HeaderName, HeaderValue], Meta(description="set, only if present")
    ] = {}
    add_headers: Annotated[
        dict[HeaderName, HeaderValue], Meta(description="set, only if absent")
    ] = {}
    append_headers: Annotated[
        dict[HeaderName, HeaderValue], Meta(description="add another value, always")
    ] = {}
    remove_json: Annotated[list[FieldName], Meta(description="top-level JSON fields to drop")] = []
    rename_json: Annotated[dict[FieldName, FieldName], Meta(description="old -> new field")] = {}
    add_json: Annotated[
        dict[FieldName, Any], Meta(description="top-level JSON fields to set if absent")
    ] = {}
    max_body_bytes: Annotated[
        int, Meta(ge=1, le=64 << 20, description="cap on a body buffered for JSON edits")
    ] = MAX_BODY


class RequestTransformerConfig(_HeaderOps, frozen=True, forbid_unknown_fields=True):
    remove_query: Annotated[list[FieldName], Meta(description="query parameters to drop")] = []
    rename_query: Annotated[dict[FieldName, FieldName], Meta(description="old -> new")] = {}
    replace_query: Annotated[dict[FieldName, str], Meta(description="set, only if present")] = {}
    add_query: Annotated[dict[FieldName, str], Meta(description="set, only if absent")] = {}
    path: Annotated[
        Annotated[str, Meta(pattern=r"^/", max_length=2048)] | None,
        Meta(description="upstream path template from route params, e.g. /v2/{id}"),
    ] = None


class ResponseTransformerConfig(_HeaderOps, frozen=True, forbid_unknown_fields=True):
    pass


def _edit_headers(ops: _HeaderOps, headers: Headers) -> None:
    for name in ops.remove_headers:
        headers.remove(name)
    for old, new in ops.rename_headers.items():
        headers.rename(old, new)
    for name, value in ops.replace_headers.items():
        if name in headers:
            headers.set(name, value)
    for name, value in ops.add_headers.items():
        if name not in headers:
            headers.add(name, value)
    for name, value in ops.append_headers.items():
        headers.add(name, value)


def _has_json_ops(ops: _HeaderOps) -> bool:
    return bool(ops.remove_json or ops.rename_json or ops.add_json)


def _edit_json(ops: _HeaderOps, doc: dict[str, Any]) -> dict[str, Any]:
    for name in ops.remove_json:
        doc.pop(name, None)
    for old, new in ops.rename_json.items():
        if old in doc:
            doc[new] = doc.pop(old)
    for name, value in ops.add_json.items():
        doc.setdefault(name, value)
    return doc


def _is_json(headers: Headers) -> bool:
    ct = headers.get_raw(b"content-type")
    return ct is not None and b"json" in ct.split(b";", 1)[0].lower()


class RequestTransformer(Plugin[RequestTransformerConfig]):
    name = "request-transformer"
    priority = 800
    Config = RequestTransformerConfig

    def __init__(self, config: RequestTransformerConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.query_ops = bool(
            config.remove_query or config.rename_query or config.replace_query or config.add_query
        )
        self.json_ops = _has_json_ops(config)

    async def access(self, ctx: Context) -> Response | None:
        cfg = self.config
        request = ctx.request
        _edit_headers(cfg, request.headers)
        if self.query_ops:
            request.query = self._edit_query(request.query)
        if cfg.path is not None:
            try:
                ctx.upstream_path = cfg.path.format_map(ctx.params)
            except KeyError as exc:
                # The route has no such parameter: an operator's mistake.
                raise InternalError(f"request-transformer path names no parameter {exc}") from None
        if self.json_ops and _is_json(request.headers):
            try:
                raw = await request.body.read(cfg.max_body_bytes)
            except ValueError:
                raise PayloadTooLarge(
                    f"bodies are limited to {cfg.max_body_bytes} bytes on this route"
                ) from None
            try:
                doc = msgspec.json.decode(raw) if raw else {}
            except msgspec.DecodeError:
                raise ValidationError.single("$", "the request body is not valid JSON") from None
            if isinstance(doc, dict):
                raw = msgspec.json.encode(_edit_json(cfg, doc))
            request.body = body_from_bytes(raw)
        return None

    def _edit_query(self, query: str) -> str:
        cfg = self.config
        pairs = parse_qsl(query, keep_blank_values=True)
        drop = set(cfg.remove_query)
        pairs = [(k, v) for k, v in pairs if k not in drop]
        pairs = [(cfg.rename_query.get(k, k), v) for k, v in pairs]
        present = {k for k, _ in pairs}
        pairs = [(k, cfg.replace_query.get(k, v)) for k, v in pairs]
        pairs += [(k, v) for k, v in cfg.add_query.items() if k not in present]
        return urlencode(pairs, quote_via=quote)


class ResponseTransformer(Plugin[ResponseTransformerConfig]):
    name = "response-transformer"
    priority = 790
    Config = ResponseTransformerConfig

    def __init__(self, config: ResponseTransformerConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.json_ops = _has_json_ops(config)
        # Buffer bodies only on routes that edit them, and only JSON ones.
        self.buffers_response = self.json_ops
        self.max_buffer_bytes = config.max_body_bytes

    def wants_body(self, ctx: Context, response: Response) -> bool:
        return _is_json(response.headers)

    def response_nowait(self, ctx: Context, response: Response) -> None:
        _edit_headers(self.config, response.headers)
        if (
            self.json_ops
            and not response.from_gateway
            and response.content is not None
            and _is_json(response.headers)
        ):
            try:
                doc = msgspec.json.decode(response.content)
            except msgspec.DecodeError:
                return  # not JSON after all: pass it through untouched
            if isinstance(doc, dict):
                response.content = msgspec.json.encode(_edit_json(self.config, doc))
