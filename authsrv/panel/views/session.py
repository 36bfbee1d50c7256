"""Login and logout. The password check and its rate limit are the admin API's (`POST /admin/sessions`):
the same store call, the same per-username budget of wrong passwords."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from authsrv.panel import security
from authsrv.panel.app import PREFIX, PanelApp
from authsrv.panel.security import CSRF_FIELD, LOGIN_COOKIE
from authsrv.rest.context import ALL_ROLES
from authsrv.store.db import AuditEntry

log = logging.getLogger("authsrv.panel")

USERNAME_MAX = 64
PASSWORD_MAX = 256


def register(panel: PanelApp) -> None:
    async def login_form(request: Request) -> Response:
        if panel._operator(request) is not None:
            return RedirectResponse(f"{PREFIX}/", status_code=303)
        return _login_page(request, panel, error="", status=200)

    async def login(request: Request) -> Response:
        if security.cross_site(request):
            return panel.error(request, None, 403, "Refused", "A login from another site is refused.")
        form = await panel.read_form(request, 8 * 1024)
        cookie = request.cookies.get(LOGIN_COOKIE)
        if cookie is not None and not security.tokens_match(cookie, _text(form, CSRF_FIELD)):
            return panel.error(request, None, 403, "Refused", "The login form's token does not match. "
                               "Reload the login page and try again.")
        username = _text(form, "username").strip()
        password = _text(form, "password")
        if not username or not password or len(username) > USERNAME_MAX or len(password) > PASSWORD_MAX:
            return _login_page(request, panel, error="Enter your username and password.", status=400)
        wait_s = panel.attempts.claim(username)
        if wait_s:
            log.info("panel login refused: locked")
            response = _login_page(request, panel, status=429,
                                   error=f"Too many wrong passwords. Try again in {max(1, int(wait_s + 0.999))} s.")
            response.headers["retry-after"] = str(max(1, int(wait_s + 0.999)))
            return response
        admin = await panel.ctx.in_thread(panel.store.check_admin_password, username, password)
        if admin is None:
            log.info("panel login refused: invalid credentials")
            await panel.ctx.in_thread(panel.store.append_audit, AuditEntry(
                0, "", username[:USERNAME_MAX], "", "panel", "session.login", "session", "invalid credentials"))
            return _login_page(request, panel, error="Wrong username or password.", status=401)
        panel.attempts.succeeded(username)
        token = panel.sessions.open(admin.username, admin.role)
        op = panel.sessions.lookup(token)
        assert op is not None
        await panel.audit(op, "session.login", "session", "ok")
        log.info("panel: %s (%s) logged in", admin.username, admin.role)
        response = RedirectResponse(f"{PREFIX}/", status_code=303)
        security.set_session_cookie(response, token)
        security.set_cookie(response, LOGIN_COOKIE, "", max_age=0)
        return response

    panel.routes.append(_route("/login", login_form, "GET"))
    panel.routes.append(_route("/login", login, "POST"))

    @panel.action("/logout", roles=ALL_ROLES)
    async def logout(request: Request, op, form) -> Response:
        panel.sessions.close(security.session_token(request))
        await panel.audit(op, "session.logout", "session", "ok")
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        security.clear_session_cookie(response)
        return response


def _login_page(request: Request, panel: PanelApp, *, error: str, status: int) -> Response:
    token = request.cookies.get(LOGIN_COOKIE) or security.new_login_token()
    response = panel.render(request, None, "login.html", status=status, error=error, login_token=token)
    security.set_cookie(response, LOGIN_COOKIE, token, max_age=security.LOGIN_COOKIE_S)
    return response


def _text(form, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _route(path: str, endpoint, method: str):
    from starlette.routing import Route

    return Route(path, endpoint, methods=[method])
