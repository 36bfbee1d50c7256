"""The Administration Panel: server-rendered pages under /panel/ on the REST listener.

Every page is a GET rendered from a Jinja2 template; every action is a POST form that redirects
(post-redirect-get), so the panel works without JavaScript. `panel.js` only refreshes the dashboard.

`PanelApp` is the frame each view module plugs into (`views/*.py`, `register(panel)`):

    @panel.page("/cards/{cardId}", roles=ALL_ROLES)          # GET, the role checked by the server
    async def card(request, op): ... return panel.render(request, op, "card.html", card=...)

    @panel.action("/cards/{cardId}/lock", roles=ALL_ROLES)   # POST, CSRF token checked first
    async def lock(request, op, form): ... await panel.audit(op, ...); return panel.redirect(...)

Actions call the same domain code as the REST API's handlers (CardService, the KYC decision, ...):
there is no second way into the store. Each action writes an audit entry (authsrv/store/audit).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import jinja2
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsrv.panel import security
from authsrv.panel.security import CSRF_FIELD, Operator, PanelSessions
from authsrv.rest.context import ALL_ROLES, RestContext
from authsrv.store.db import AuditEntry, Role

log = logging.getLogger("authsrv.panel")

HERE = Path(__file__).parent
PREFIX = "/panel"
FORM_BYTES_MAX = 64 * 1024  # a panel form is a few fields; clearing uploads have their own bound
STATIC_MAX_AGE_S = 3600

PageHandler = Callable[[Request, Operator], Awaitable[Response]]
ActionHandler = Callable[[Request, Operator, FormData], Awaitable[Response]]


@attrs.frozen
class NavItem:
    path: str
    label: str
    roles: frozenset[Role]


# The menu, in order. A link shows only to the roles that may open the page (the server checks too).
NAV: tuple[NavItem, ...] = (
    NavItem("/panel/", "Dashboard", ALL_ROLES),
    NavItem("/panel/users", "Users", ALL_ROLES),
    NavItem("/panel/kyc", "KYC review", ALL_ROLES),
    NavItem("/panel/transactions", "Transactions", ALL_ROLES),
    NavItem("/panel/partner-balances", "Partner balances", ALL_ROLES),
    NavItem("/panel/summary", "Balance summary", ALL_ROLES),
    NavItem("/panel/fees", "Fees", ALL_ROLES),
    NavItem("/panel/clearing", "Clearing", ALL_ROLES),
    NavItem("/panel/outbox", "Outbox", frozenset({Role.admin, Role.manager})),  # the REST OUTBOX_ROLES
    NavItem("/panel/fx-rates", "FX rates", ALL_ROLES),
    NavItem("/panel/admins", "Admin users", frozenset({Role.admin})),
    NavItem("/panel/audit", "Audit log", ALL_ROLES),
)


class SecurityHeaders:
    """Every panel response gets the CSP and no-store headers (static assets: cacheable)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(PREFIX + "/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                for name, value in security.PAGE_HEADERS.items():
                    if static and name in ("cache-control", "pragma"):
                        continue
                    headers.append((name.encode(), value.encode()))
                if static:
                    headers.append((b"cache-control", f"public, max-age={STATIC_MAX_AGE_S}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class PanelApp:
    def __init__(self, ctx: RestContext, *, attempts, sessions: PanelSessions | None = None) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.attempts = attempts  # the admin API's login limiter (shared: one budget per username)
        self.sessions = sessions or PanelSessions()
        self.routes: list[Route] = []
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["money"] = money
        self.templates.filters["pretty_json"] = pretty_json

    # -- registration ------------------------------------------------------------------------------

    def page(self, path: str, *, roles: frozenset[Role] = ALL_ROLES):
        def register(handler: PageHandler) -> PageHandler:
            async def endpoint(request: Request) -> Response:
                op = self._operator(request)
                if op is None:
                    return self._to_login(request)
                if op.role not in roles:
                    return self.forbidden(request, op, roles)
                return await handler(request, op)

            self.routes.append(Route(path, endpoint, methods=["GET"]))
            return handler

        return register

    def action(self, path: str, *, roles: frozenset[Role], form_bytes_max: int = FORM_BYTES_MAX):
        def register(handler: ActionHandler) -> ActionHandler:
            async def endpoint(request: Request) -> Response:
                op = self._operator(request)
                if op is None:
                    return self._to_login(request)
                form = await self.read_form(request, form_bytes_max)
                if not security.tokens_match(op.csrf_token, _field(form, CSRF_FIELD)):
                    log.info("panel: %s refused a POST to %s without a valid CSRF token", op.username,
                             request.url.path)
                    return self.error(request, op, 403, "Refused", "The form's CSRF token is missing or not this "
                                      "session's. Reload the page and try again.")
                if op.role not in roles:
                    await self.audit(op, f"refused:{path.strip('/')}", request.url.path, "forbidden")
                    return self.forbidden(request, op, roles)
                return await handler(request, op, form)

            self.routes.append(Route(path, endpoint, methods=["POST"]))
            return handler

        return register

    # -- helpers for views -------------------------------------------------------------------------

    def render(self, request: Request, op: Operator | None, template: str, *, status: int = 200,
               **values: Any) -> HTMLResponse:
        token = security.session_token(request)
        flash = self.sessions.take_flash(token) if op is not None else ""
        nav = [item for item in NAV if op is not None and op.role in item.roles]
        body = self.templates.get_template(template).render(
            op=op, nav=nav, flash=flash, path=request.url.path, csrf_field=CSRF_FIELD, **values)
        return HTMLResponse(body, status_code=status)

    def redirect(self, request: Request, path: str, *, flash: str = "") -> Response:
        """303 to `path` (post-redirect-get), with a message for the page it lands on."""
        assert path.startswith(PREFIX + "/") or path == PREFIX, path
        if flash:
            self.sessions.set_flash(security.session_token(request), flash)
        return RedirectResponse(path, status_code=303)

    def error(self, request: Request, op: Operator | None, status: int, title: str, detail: str) -> HTMLResponse:
        return self.render(request, op, "error.html", status=status, title=title, detail=detail)

    def forbidden(self, request: Request, op: Operator, roles: frozenset[Role]) -> HTMLResponse:
        allowed = ", ".join(sorted(role.value for role in roles))
        return self.error(request, op, 403, "Not allowed", f"Your role ({op.role}) may not do this; "
                          f"it needs {allowed}.")

    def not_found(self, request: Request, op: Operator, what: str = "page") -> HTMLResponse:
        return self.error(request, op, 404, "Not found", f"No such {what}.")

    async def audit(self, op: Operator, action: str, target: str, outcome: str, *, before: Any = None,
                    after: Any = None, detail: str = "") -> None:
        entry = AuditEntry(0, "", op.username, str(op.role), "panel", action, target, outcome,
                           _as_json(before), _as_json(after), detail)
        await self.ctx.in_thread(self.store.append_audit, entry)

    async def read_form(self, request: Request, bytes_max: int) -> FormData:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > bytes_max):
            raise HTTPException(413, "form too large")
        return await request.form(max_files=4, max_fields=200)

    # -- sessions ----------------------------------------------------------------------------------

    def _operator(self, request: Request) -> Operator | None:
        return self.sessions.lookup(security.session_token(request))

    def _to_login(self, request: Request) -> Response:
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        if security.session_token(request) is not None:
            security.clear_session_cookie(response)
        return response

    # -- the app -----------------------------------------------------------------------------------

    def mount(self) -> Mount:
        app = Starlette(routes=[
            *self.routes,
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="panel-static"),
        ], exception_handlers={HTTPException: self._http_error})
        return Mount(PREFIX, app=SecurityHeaders(app))

    async def _http_error(self, request: Request, error: HTTPException) -> Response:
        op = self._operator(request)
        titles = {404: "Not found", 405: "Method not allowed", 413: "Too large", 400: "Bad request"}
        return self.error(request, op, error.status_code, titles.get(error.status_code, "Error"),
                          str(error.detail) if error.detail else "")


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _as_json(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def money(minor: int, exponent: int = 2) -> str:
    """Integer minor units as a decimal string: 12345 -> '123.45'."""
    sign = "-" if minor < 0 else ""
    minor = abs(int(minor))
    if exponent == 0:
        return f"{sign}{minor:,}"
    whole, fraction = divmod(minor, 10**exponent)
    return f"{sign}{whole:,}.{fraction:0{exponent}d}"


def pretty_json(text: str) -> str:
    if not text:
        return ""
    try:
        return json.dumps(json.loads(text), indent=1, sort_keys=True)
    except ValueError:
        return text


def build_panel(ctx: RestContext, *, attempts) -> Mount:
    """The panel with every view registered, as a Mount for the REST app's routes."""
    from authsrv.panel.views import register_all

    panel = PanelApp(ctx, attempts=attempts)
    register_all(panel)
    return panel.mount()
