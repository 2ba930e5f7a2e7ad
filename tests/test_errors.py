"""One error hierarchy (``triogate.errors``) and its documentation.

* Every ``GatewayError`` is either concrete (its own ``code``, a status and
  title of its own family) or a family that is never raised itself; codes
  are unique, so a code names one class.
* No other triogate module defines an error class: what a front door can
  answer is exactly this tree (private signals excepted, listed below).
* Every class a front-door module raises is a ``TriogateError`` or a
  documented signal.
* docs/errors.md has a row for every code and no row for a code that does
  not exist; the contract's table (status -> codes) is all there.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

import triogate
import triogate.errors as errors
import triogate.plugins
import triogate.storage
from triogate.errors import (
    ClientDisconnected,
    ConfigError,
    GatewayError,
    SecretsError,
    StorageFull,
    StoreError,
    TriogateError,
    Unauthorized,
    UpstreamError,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "errors.md"

# Exceptions defined outside triogate.errors on purpose: signals inside one
# part that never reach a client (each documented where it is defined).
LOCAL_SIGNALS = {
    "triogate.dataplane.exchange.StaleConnection",
    "triogate.policy.userregex.RegexError",
    "triogate.cluster.replica.Gap",
    # Redis did not answer: caught by the one caller and turned into its
    # fallback (events wait; history answers partial), never user-facing.
    "triogate.cluster.events.ClaimsUnavailable",
    "triogate.control.history.HistoryUnavailable",
}

# The contract's table of codes (CONTRACT §4), status by status, plus the
# codes added since (408, 411, 417, 503 TOO_MANY_CONNECTIONS, 507).
CONTRACT = {
    400: {
        "VALIDATION_ERROR",
        "INVALID_PATH_PARAMETER",
        "BAD_REQUEST",
        "INVALID_WEBSOCKET_HANDSHAKE",
        "WEBSOCKET_DISABLED",
    },
    401: {
        "MISSING_KEY",
        "INVALID_KEY",
        "KEY_REVOKED",
        "KEY_EXPIRED",
        "KEY_ROTATED",
        # The jwt plugin's (issue 15).
        "MISSING_TOKEN",
        "INVALID_TOKEN",
        "TOKEN_EXPIRED",
    },
    403: {"INSUFFICIENT_SCOPE", "FORBIDDEN", "KEY_DISABLED", "ROLE_DENIED"},
    404: {"ROUTE_NOT_FOUND", "NOT_FOUND"},
    405: {"METHOD_NOT_ALLOWED"},
    408: {"REQUEST_TIMEOUT"},
    409: {
        "CONFLICT",
        "IDENTITY_HAS_KEYS",
        "PLAN_IN_USE",
        "ROLE_IN_USE",
        "INSUFFICIENT_CREDITS",
        "NO_CREDITS",
    },
    411: {"LENGTH_REQUIRED"},
    413: {"PAYLOAD_TOO_LARGE"},
    417: {"EXPECTATION_FAILED"},
    429: {"RATE_LIMITED", "QUOTA_EXCEEDED"},
    431: {"HEADERS_TOO_LARGE"},
    500: {"INTERNAL_ERROR"},
    502: {"BAD_GATEWAY", "UPSTREAM_TLS_ERROR"},
    503: {
        "UPSTREAM_UNAVAILABLE",
        "TOO_MANY_CONNECTIONS",
        "STORE_UNAVAILABLE",
        "LIMITS_UNAVAILABLE",
    },
    504: {"UPSTREAM_TIMEOUT"},
    507: {"STORAGE_FULL"},
}

# RFC 9110 renamed 413; Python 3.11's HTTPStatus still has the old phrase.
TITLES = {413: "Content Too Large"}


def subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def triogate_modules() -> list[str]:
    """Every module of the installed package. triogate.plugins and
    triogate.storage live in their own folders (mapped at install time), so
    they are walked too."""
    names = []
    for package in (triogate, triogate.plugins, triogate.storage):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if not info.name.endswith(".__main__"):  # runs the CLI when imported
                names.append(info.name)
    return sorted(set(names))


def all_modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in triogate_modules()]


def gateway_errors() -> list[type[GatewayError]]:
    all_modules()  # a subclass defined anywhere must be found
    # Third-party plugins may add their own (docs/plugins.md): not ours.
    return [c for c in subclasses(GatewayError) if c.__module__.split(".")[0] == "triogate"]


def concrete(cls: type[GatewayError]) -> bool:
    return "code" in vars(cls)


def test_the_tree_has_its_families() -> None:
    assert issubclass(ConfigError, TriogateError)
    assert issubclass(StoreError, TriogateError)
    assert issubclass(SecretsError, TriogateError)
    assert issubclass(GatewayError, TriogateError)
    # 507 is both a refusal and a store condition: the CLI and the admin
    # API answer it like any refusal.
    assert issubclass(StorageFull, GatewayError) and issubclass(StorageFull, StoreError)
    # A signal, not an error: ``except TriogateError`` must not swallow it.
    assert not issubclass(ClientDisconnected, TriogateError)


def test_every_gateway_error_is_concrete_or_a_family() -> None:
    classes = list(gateway_errors())
    assert any(concrete(cls) for cls in classes)  # the loop below checks something
    for cls in classes:
        if concrete(cls):
            assert cls.status in CONTRACT, cls
            assert re.fullmatch(r"[A-Z][A-Z_]+", cls.code), cls
            phrase = TITLES.get(cls.status, HTTPStatus(cls.status).phrase)
            assert cls.title == phrase, f"{cls.__name__}: title {cls.title!r}, not {phrase!r}"
        else:
            # A family: never raised itself, every member is concrete.
            assert cls in (Unauthorized, UpstreamError), f"{cls.__name__} sets no code"
            members = list(subclasses(cls))
            assert members and all(concrete(m) for m in members), cls
            assert {m.status for m in members} == (
                {401} if cls is Unauthorized else {502, 503, 504}
            ), cls


def test_codes_are_unique() -> None:
    seen: dict[str, type[GatewayError]] = {}
    for cls in [c for c in gateway_errors() if concrete(c)]:
        assert cls.code not in seen or cls is seen[cls.code], (cls, seen.get(cls.code))
        seen[cls.code] = cls
    assert GatewayError.code == "INTERNAL_ERROR"  # anything unnamed is a 500


def test_the_contract_codes_all_exist() -> None:
    by_status: dict[int, set[str]] = {}
    for cls in gateway_errors():
        if concrete(cls):
            by_status.setdefault(cls.status, set()).add(cls.code)
    assert by_status == CONTRACT


def test_no_other_module_defines_an_error_class() -> None:
    """Each error class lives in triogate.errors (one tree, one package);
    modules import it from there rather than re-defining or re-exporting
    under another name."""
    strays = []
    for module in all_modules():
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not module.__name__.startswith("triogate.errors")
                and not name.startswith("_")
                and f"{obj.__module__}.{name}" not in LOCAL_SIGNALS
            ):
                strays.append(f"{obj.__module__}.{name}")
    assert strays == []


def _raised_names(path: Path) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            if isinstance(func, ast.Name) and func.id[:1].isupper():
                yield func.id, node.lineno


# What the front doors and everything behind them on the request path may
# raise besides the tree: Python's own (programming errors and I/O inside
# helpers that their callers translate).
BUILTIN_OK = {"RuntimeError", "ValueError", "OSError", "TimeoutError", "NotImplementedError"}
# A TLS socket says "not yet" as a plain non-blocking one does (dataplane.tls).
BUILTIN_OK |= {"BlockingIOError"}


@pytest.mark.parametrize("folder", ["core/dataplane", "core/http", "core/admin", "plugins"])
def test_the_request_path_raises_only_the_tree(folder: str) -> None:
    """Every class the front doors (and the pipeline, plugins and codec behind
    them) raise by name is a TriogateError, so it has a status and a code."""
    names = set(vars(errors)) | BUILTIN_OK | {"StaleConnection"}
    paths = sorted((ROOT / folder).glob("*.py"))
    assert paths, folder  # a moved folder must not pass with nothing read
    for path in paths:
        for name, line in _raised_names(path):
            assert name in names, f"{path.relative_to(ROOT)}:{line} raises {name}"
            cls = getattr(errors, name, None)
            if cls is not None and name != "ClientDisconnected":
                assert issubclass(cls, TriogateError), name


def _documented() -> dict[str, int]:
    rows: dict[str, int] = {}
    for line in DOCS.read_text().splitlines():
        m = re.fullmatch(r"\| (\d{3}) \| `([A-Z_]+)` \|.*", line)
        if m:
            assert m[2] not in rows, f"docs/errors.md: {m[2]} twice"
            rows[m[2]] = int(m[1])
    return rows


def test_docs_list_every_code_and_only_real_ones() -> None:
    real = {c.code: c.status for c in gateway_errors() if concrete(c)}
    assert _documented() == real


def test_admin_docs_codes_exist() -> None:
    """docs/admin-api.md's own error table names only real codes."""
    text = (ROOT / "docs" / "admin-api.md").read_text()
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    codes = set(re.findall(r"`([A-Z][A-Z_]+)`", section))
    real = {c.code for c in gateway_errors() if concrete(c)}
    assert codes and codes <= real, codes - real


def test_problem_body_and_carried_problem() -> None:
    """The body a front door renders and the ``Problem`` it carries on the
    response (for telemetry) say the same."""
    from triogate.dataplane.pipeline import problem_response

    error = errors.RateLimited("slow down", limit="minute")
    error.headers["Retry-After"] = "3"
    response = problem_response(error, "rid-7")
    assert response.problem == errors.Problem("RATE_LIMITED", "rid-7")
    assert response.from_gateway and response.status == 429
    body = msgspec.json.decode(response.content or b"")
    assert body == {
        "type": "about:blank",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "slow down",
        "code": "RATE_LIMITED",
        "request_id": "rid-7",
        "limit": "minute",
    }
    assert response.headers.get_raw(b"retry-after") == b"3"
