"""The panel's frame: login and logout, the session cookie, CSRF, CSP and no-store, role checks,
the login rate limit shared with the admin API, and audit entries (view tests over real HTTPS)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.restclient import https

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def admin_password(data_dir: Path) -> str:
    return (data_dir / "admin-password").read_text().strip()


async def panel_login(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    form = await client.get("/panel/login")
    assert form.status_code == 200
    token = CSRF.search(form.text).group(1)
    return await client.post("/panel/login", data={"username": username, "password": password, "csrf_token": token})


def csrf_of(page: httpx.Response) -> str:
    return CSRF.search(page.text).group(1)


async def test_login_dashboard_logout(server, data_dir):
    async with https(data_dir, server.rest_port) as client:
        assert (await client.get("/panel/")).headers["location"].endswith("/panel/login")
        login = await client.get("/panel/login")
        assert 'name="username"' in login.text and 'name="password"' in login.text
        reply = await panel_login(client, "admin", admin_password(data_dir))
        assert reply.status_code == 303 and reply.headers["location"] == "/panel/"
        cookie = reply.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
        page = await client.get("/panel/")
        assert page.status_code == 200 and "admin" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert page.headers["cache-control"] == "no-store"
        for path in ("/panel/users", "/panel/kyc", "/panel/transactions", "/panel/partner-balances",
                     "/panel/summary", "/panel/audit"):
            assert f'href="{path}"' in page.text, path
        logout = await client.post("/panel/logout", data={"csrf_token": csrf_of(page)})
        assert logout.status_code == 303
        assert (await client.get("/panel/")).status_code == 303
        audit = [e.action for e in server.store.audit_page(__import__("authsrv.store.db", fromlist=["x"]).AuditQuery())]
        assert audit[:2] == ["session.logout", "session.login"]


async def test_post_without_csrf_token_is_403(server, data_dir):
    async with https(data_dir, server.rest_port) as client:
        await panel_login(client, "admin", admin_password(data_dir))
        assert (await client.post("/panel/logout", data={})).status_code == 403
        assert (await client.post("/panel/logout", data={"csrf_token": "forged"})).status_code == 403
        assert (await client.get("/panel/")).status_code == 200  # still logged in


async def test_wrong_password_and_rate_limit(server, data_dir):
    async with https(data_dir, server.rest_port) as client:
        for _ in range(5):
            assert (await panel_login(client, "admin", "wrong-password")).status_code == 401
        locked = await panel_login(client, "admin", admin_password(data_dir))
        assert locked.status_code == 429 and "retry-after" in locked.headers
        # The admin API shares the budget.
        api = await client.post("/admin/sessions", json={"username": "admin", "password": admin_password(data_dir)})
        assert api.status_code == 429


async def test_static_assets_cacheable_pages_not(server, data_dir):
    async with https(data_dir, server.rest_port) as client:
        css = await client.get("/panel/static/panel.css")
        assert css.status_code == 200 and "max-age" in css.headers["cache-control"]
        assert (await client.get("/panel/login")).headers["cache-control"] == "no-store"


async def test_admin_api_actions_are_audited(server, data_dir):
    from authsrv.store.db import AuditQuery
    from tests.restclient import admin_login, bearer

    async with https(data_dir, server.rest_port) as client:
        token = await admin_login(client, "admin", admin_password(data_dir))
        created = await client.post("/admin/users", headers=bearer(token),
                                    json={"username": "emp1", "role": "Employee", "password": "x" * 14})
        assert created.status_code == 201
        refused = await client.post("/admin/users", headers=bearer(token),
                                    json={"username": "emp1", "role": "Employee", "password": "x" * 14})
        assert refused.status_code == 409
    entries = server.store.audit_page(AuditQuery(channel="api"))
    assert [(e.actor, e.action, e.outcome) for e in entries[:2]] == [
        ("admin", "admin.users.create", "HTTP 409"), ("admin", "admin.users.create", "HTTP 201")]
    assert "x" * 14 not in repr(entries)


def test_sessions_idle_timeout_lifetime_and_bound():
    from authsrv.panel.security import PanelSessions
    from authsrv.store.db import Role

    now = [0.0]
    sessions = PanelSessions(idle_s=10, lifetime_s=25, clock=lambda: now[0], sessions_max=2)
    token = sessions.open("ann", Role.manager)
    for _ in range(2):
        now[0] += 9  # active: the idle clock restarts on each request
        assert sessions.lookup(token).username == "ann"
    now[0] += 8  # 26 s since login: past the lifetime though never idle for 10 s
    assert sessions.lookup(token) is None
    idle = sessions.open("bob", Role.employee)
    now[0] += 10
    assert sessions.lookup(idle) is None
    first, second, third = (sessions.open(name, Role.employee) for name in ("c", "d", "e"))
    assert len(sessions) == 2 and sessions.lookup(first) is None and sessions.lookup(third) is not None
    assert sessions.lookup("x" * 500) is None and sessions.lookup(None) is None
