"""The console's web layer: a quart blueprint under ``/ui`` on the admin app.

Sessions, sign-in and sign-out, the security headers, and the wrapper every
page goes through: the session's admin is authenticated again (as the admin
API does: a revoked admin's sessions end here), a write must carry the
session's CSRF token, and the page then reaches the data only through
``Dispatcher`` (the admin API's endpoint table). The pages themselves are in
``pages_keys`` and ``pages_other``.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jinja2
import trio
from quart import Blueprint, Response, g, request

from triogate.admin.backend import AdminBackend
from triogate.config import Config
from triogate.config_admin import AdminConfig
from triogate.console.dispatch import Dispatcher
from triogate.console.sessions import Session, SessionStore
from triogate.control.admins import Principal
from triogate.errors import Forbidden, GatewayError, NotFound, Unauthorized
from triogate.http.netaddr import client_ip

__all__ = [
    "COOKIE",
    "CSP",
    "LOGIN_COOKIE",
    "Console",
    "Page",
    "install_console",
    "redirect",
    "refuse_other_sites",
]

COOKIE = "tg_console"
#: The sign-in form's token cookie (login CSRF; see ``_sign_in_pages``).
LOGIN_COOKIE = "tg_console_login"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: Where signing in leads: the first of these the admin may read.
LANDING = (
    ("/keys", "/ui/keys"),
    ("/identities", "/ui/identities"),
    ("/audit", "/ui/audit"),
    ("/admins", "/ui/admins"),
    ("/routes", "/ui/routes"),
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class Page:
    """One signed-in request: the session, its admin, where it came from."""

    session: Session
    principal: Principal
    source_ip: str | None
    form: dict[str, str]


View = Callable[..., Awaitable[Response]]


class Console:
    def __init__(self, gw: AdminBackend) -> None:
        self.gw = gw
        self.api = Dispatcher(gw)
        self.sessions = SessionStore(
            trio.current_time, lambda: self.settings().session_idle_seconds
        )
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("triogate.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["when"] = when

    def settings(self) -> AdminConfig:
        """``[admin]`` of the active config (a reload changes it)."""
        config = getattr(self.gw, "config", None)
        return config.admin if isinstance(config, Config) else AdminConfig()

    def render(
        self, template: str, page: Page | None, *, status: int = 200, **context: Any
    ) -> Response:
        if page is not None:
            principal = page.principal
            context.update(
                me=principal.id,
                csrf=page.session.csrf,
                flash=page.session.pop_flash(),
                may=lambda method, path: self.api.may(principal, method, path),
            )
        html = self.templates.get_template(template).render(**context)
        return Response(html, status=status, content_type="text/html; charset=utf-8")

    async def call(self, page: Page, method: str, path: str, **kwargs: Any) -> Any:
        return await self.api.call(page.principal, method, path, source_ip=page.source_ip, **kwargs)

    async def begin(self, *, write: bool, touch: bool = True) -> Page | Response:
        """The signed-in page, or where to go instead (sign-in). A write
        without a live session or the session's CSRF token is refused (403).
        ``touch=False``: a page's own polling, which does not count as the
        admin at work (the idle timeout still ends an unattended session)."""
        remote = request.remote_addr
        source_ip = client_ip(remote) if remote else None
        if write:
            refuse_other_sites()
        session = self.sessions.get(request.cookies.get(COOKIE), touch=touch)
        if session is None:
            if write:
                raise Forbidden("no console session: sign in at /ui/login")
            return to_login("/ui/login")
        try:
            principal = self.api.authenticate(session.admin_key)
        except Unauthorized:
            # Revoked (or gone): every session of that admin ends now.
            self.sessions.drop_admin(session.admin_id)
            if write:
                raise Forbidden("this console session has ended: sign in again") from None
            return to_login("/ui/login?" + urlencode({"ended": "1"}))
        g.admin_id = principal.id  # who, for the admin access log (as the API's view)
        form: dict[str, str] = {}
        if write:
            raw = await request.form
            form = {k: raw.get(k, "") for k in raw}
            sent = form.get("csrf") or request.headers.get("X-CSRF-Token")
            if not session.csrf_ok(sent):
                raise Forbidden("the console's CSRF token is missing or wrong")
        return Page(session, principal, source_ip, form)

    def page(
        self, template_on_error: str = "error.html", *, touch: bool = True
    ) -> Callable[[View], View]:
        """A read page: signed in, and an API refusal (403, 404) shown as a
        page with the API's status and message."""

        def wrap(view: View) -> View:
            @functools.wraps(view)
            async def run(**params: str) -> Response:
                page = await self.begin(write=False, touch=touch)
                if isinstance(page, Response):
                    return page
                try:
                    return await view(page, **params)
                except GatewayError as error:
                    return self.render(
                        template_on_error, page, status=error.status, error=error.problem()
                    )

            return run

        return wrap

    def action(self, back: Callable[..., str]) -> Callable[[View], View]:
        """A write: signed in, CSRF checked; a permission refusal is the
        API's 403; any other refusal (a bad field, a conflict) goes back to
        ``back(**params)`` with the message shown there."""

        def wrap(view: View) -> View:
            @functools.wraps(view)
            async def run(**params: str) -> Response:
                page = await self.begin(write=True)
                assert isinstance(page, Page)
                try:
                    return await view(page, **params)
                except Forbidden:
                    raise
                except GatewayError as error:
                    page.session.flash = ("error", _message(error))
                    return redirect(back(**params), 303)

            return run

        return wrap


def when(value: str | None) -> str:
    """An RFC 3339 time as people read it: ``2027-01-01 12:00:00 UTC``."""
    if not value:
        return ""
    return value[:19].replace("T", " ") + " UTC"


def to_login(location: str) -> Response:
    """To the sign-in page. An htmx request (the live panel's poll) is told
    to load it as a whole page (``HX-Redirect``): a plain redirect would be
    followed by the XHR and the sign-in form swapped into the panel."""
    if request.headers.get("HX-Request") == "true":
        response = Response("", status=200)
        response.headers["HX-Redirect"] = location
        return response
    return redirect(location)


def redirect(location: str, status: int = 302) -> Response:
    """A redirect as quart's own Response (quart.redirect makes werkzeug's)."""
    response = Response("", status=status)
    response.headers["Location"] = location
    return response


def refuse_other_sites() -> None:
    """A write that the browser says another site started (``Sec-Fetch-Site``,
    sent by every current browser) is refused before anything else: defence
    in depth beside the CSRF tokens, and the only one against a sibling
    subdomain that plants cookies (it is "same-site", not "same-origin")."""
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("cross-site", "same-site"):
        raise Forbidden(f"a console write started by another site ({site}) is refused")


def _message(error: GatewayError) -> str:
    errors = getattr(error, "errors", None)
    if errors:
        return "; ".join(f"{e.path}: {e.message}" for e in errors[:10])
    return error.detail


def _login_form(
    console: Console, *, status: int = 200, error: str | None = None, ended: bool = False
) -> Response:
    """The sign-in form with its token (login CSRF: another site must not
    sign the browser in as an admin of its choosing). The token is also in a
    SameSite=Strict cookie that only a page of this origin's own makes the
    browser send, and that no other site can read; a sign-in must carry
    both, equal. The same token serves until a sign-in succeeds."""
    token = request.cookies.get(LOGIN_COOKIE) or ""
    if len(token) != 43:  # token_urlsafe(32); anything else is not ours
        token = secrets.token_urlsafe(32)
    response = console.render(
        "login.html", None, status=status, error=error, ended=ended, login_csrf=token
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        path="/ui/login",
        httponly=True,
        samesite="Strict",
        secure=request.scheme == "https",
    )
    return response


def _sign_in_pages(bp: Blueprint, console: Console) -> None:
    async def login_form() -> Response:
        return _login_form(console, ended=request.args.get("ended") == "1")

    async def login() -> Response:
        refuse_other_sites()
        form = await request.form
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        sent = form.get("login_csrf", "")
        if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
            # No session, no cookie: the form again (with a token of this
            # browser's own), and nothing learnt about the key.
            return _login_form(
                console, status=403, error="The sign-in form had expired: sign in again."
            )
        key = form.get("key", "").strip()
        try:
            principal = console.api.authenticate(key)
        except Unauthorized as error:
            # No session: the form again, with the API's reason.
            return _login_form(console, status=401, error=error.detail)
        old = request.cookies.get(COOKIE)
        if old:
            console.sessions.drop(old)
        session = console.sessions.create(key, principal.id)
        response = redirect("/ui/", 303)
        response.set_cookie(
            COOKIE,
            session.id,
            path="/ui",
            httponly=True,
            samesite="Strict",
            secure=request.scheme == "https",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
        return response

    async def logout() -> Response:
        page = await console.begin(write=True)
        assert isinstance(page, Page)
        console.sessions.drop(page.session.id)
        response = redirect("/ui/login", 303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @console.page()
    async def index(page: Page) -> Response:
        """The first page this admin may read (an auditor: the audit log)."""
        for path, ui in LANDING:
            if console.api.may(page.principal, "GET", path):
                return redirect(ui)
        return redirect("/ui/config")

    bp.add_url_rule("/login", "login_form", login_form, methods=["GET"])
    bp.add_url_rule("/login", "login", login, methods=["POST"])
    bp.add_url_rule("/logout", "logout", logout, methods=["POST"])
    bp.add_url_rule("/", "index", index, methods=["GET"])


def install_console(app: Any, gw: AdminBackend) -> Console:
    """Add the console's routes to the admin app. With ``[admin] console =
    false`` every ``/ui`` path answers 404, as an unknown admin path does."""
    from triogate.console.pages_keys import key_pages
    from triogate.console.pages_other import other_pages

    console = Console(gw)
    bp = Blueprint(
        "console", __name__, url_prefix="/ui", static_folder="static", static_url_path="/static"
    )

    @bp.before_request
    async def console_switch() -> None:
        if not console.settings().console:
            raise NotFound(f"no admin endpoint {request.path}")

    @bp.after_request
    async def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

    _sign_in_pages(bp, console)
    key_pages(bp, console)
    other_pages(bp, console)
    app.register_blueprint(bp)
    app.extensions["triogate.console"] = console
    return console
