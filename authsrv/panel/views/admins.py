"""Admin users (Admin only; other roles get 403): the list, creating Managers and Employees,
disabling and enabling them, and resetting a password.

Creating one is `POST /admin/users`'s code: the form becomes an `AdminUserCreate` (the same
username pattern, password length of at least 12, role Manager or Employee) and
`sessions_api.create_admin_user` stores it. Disabling writes `admins.disabled` (a disabled admin
cannot log in: `Store.check_admin_password`) and ends the user's live panel and admin API
sessions; a password reset ends them too. An Admin is never disabled or reset from here, so an
Admin cannot lock themself or another Admin out. Every action is audited, never with a password.
"""

from __future__ import annotations

import logging
import secrets

import msgspec
from starlette.requests import Request

from authsrv.panel.app import PanelApp
from authsrv.rest.sessions_api import (
    ADMIN_PASSWORD_LENGTH_MIN,
    SECRET_LENGTH_MAX,
    AdminUserCreate,
    create_admin_user,
)
from authsrv.store import admins_admin
from authsrv.store.db import Role, StoreConflict

log = logging.getLogger("authsrv.panel")

ADMIN_ONLY = frozenset({Role.admin})
CREATABLE_ROLES = ("Employee", "Manager")
GENERATED_PASSWORD_BYTES = 15  # 20 URL-safe characters
USERNAME_MAX = 64


def register(panel: PanelApp) -> None:
    async def show(request: Request, op, *, status: int = 200, error: str = "", form: dict | None = None):
        admins = await panel.ctx.in_thread(admins_admin.admins_with_state, panel.store)
        return panel.render(request, op, "admins.html", status=status, admins=admins, error=error,
                            form=form or {"username": "", "role": "Employee"}, roles=CREATABLE_ROLES,
                            password_min=ADMIN_PASSWORD_LENGTH_MIN, admin_role=Role.admin)

    @panel.page("/admins", roles=ADMIN_ONLY)
    async def admins(request: Request, op):
        return await show(request, op)

    @panel.action("/admins", roles=ADMIN_ONLY)
    async def create(request: Request, op, form):
        typed = {"username": _text(form, "username").strip()[:USERNAME_MAX + 1], "role": _text(form, "role")}
        try:
            body = msgspec.convert({**typed, "password": _text(form, "password")}, AdminUserCreate)
        except msgspec.ValidationError as error:
            await panel.audit(op, "admin.users.create", f"admin:{typed['username'][:USERNAME_MAX]}", "invalid")
            return await show(request, op, status=400, error=_create_error(str(error)), form=typed)
        try:
            info = await panel.ctx.in_thread(create_admin_user, panel.store, body, created_by=op.username)
        except StoreConflict:
            await panel.audit(op, "admin.users.create", f"admin:{body.username}", "exists")
            return await show(request, op, status=409, error=f"An admin user named {body.username} exists already.",
                              form=typed)
        await panel.audit(op, "admin.users.create", f"admin:{info.username}", "ok",
                          after={"username": info.username, "role": str(info.role), "createdBy": info.created_by})
        log.info("panel: %s created admin user %s (%s)", op.username, info.username, info.role)
        return panel.redirect(request, "/panel/admins", flash=f"{info.role} {info.username} created.")

    async def target_of(request: Request, op, *, audit: bool = True):
        """(the Manager or Employee the path names, or None) and the refusal page when refused."""
        username = request.path_params["username"]
        target = None
        if len(username) <= USERNAME_MAX:
            target = await panel.ctx.in_thread(admins_admin.admin_listed, panel.store, username)
        if target is None:
            return None, panel.not_found(request, op, "admin user")
        if target.role is Role.admin:
            if audit:
                await panel.audit(op, f"refused:admins/{request.url.path.rsplit('/', 1)[-1]}", f"admin:{username}",
                                  "forbidden", detail="an Admin cannot be disabled or reset from the panel")
            return None, panel.error(request, op, 403, "Not allowed", "An Admin cannot be disabled, enabled or "
                                     "reset here: only Managers and Employees.")
        return target, None

    def end_sessions(username: str) -> int:
        closed = panel.sessions.close_where(lambda operator: operator.username == username)
        return closed + panel.ctx.admin_sessions.revoke_where(lambda subject: subject.username == username)

    @panel.page("/admins/{username}", roles=ADMIN_ONLY)
    async def admin_user(request: Request, op):
        target, refusal = await target_of(request, op, audit=False)
        if target is None:
            return refusal
        return panel.render(request, op, "admins_user.html", target=target, error="",
                            password_min=ADMIN_PASSWORD_LENGTH_MIN)

    async def set_disabled(request: Request, op, disabled: bool):
        target, refusal = await target_of(request, op)
        if target is None:
            return refusal
        changed = await panel.ctx.in_thread(admins_admin.set_admin_disabled, panel.store, target.username, disabled)
        if not changed:
            return panel.not_found(request, op, "admin user")
        ended = end_sessions(target.username) if disabled else 0
        action = "admin.users.disable" if disabled else "admin.users.enable"
        await panel.audit(op, action, f"admin:{target.username}", "ok", before={"disabled": target.disabled},
                          after={"disabled": disabled}, detail=f"{ended} sessions ended" if disabled else "")
        log.info("panel: %s %s admin user %s (%d sessions ended)", op.username,
                 "disabled" if disabled else "enabled", target.username, ended)
        what = f"{target.username} disabled: they cannot log in, and their sessions ended." if disabled else (
            f"{target.username} enabled: they may log in again.")
        return panel.redirect(request, "/panel/admins", flash=what)

    @panel.action("/admins/{username}/disable", roles=ADMIN_ONLY)
    async def disable(request: Request, op, form):
        return await set_disabled(request, op, True)

    @panel.action("/admins/{username}/enable", roles=ADMIN_ONLY)
    async def enable(request: Request, op, form):
        return await set_disabled(request, op, False)

    @panel.action("/admins/{username}/password", roles=ADMIN_ONLY)
    async def reset_password(request: Request, op, form):
        target, refusal = await target_of(request, op)
        if target is None:
            return refusal
        typed = _text(form, "password")
        generated = not typed
        password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES) if generated else typed
        if not ADMIN_PASSWORD_LENGTH_MIN <= len(password) <= SECRET_LENGTH_MAX:
            await panel.audit(op, "admin.users.password", f"admin:{target.username}", "invalid")
            return panel.render(request, op, "admins_user.html", status=400, target=target,
                                password_min=ADMIN_PASSWORD_LENGTH_MIN,
                                error=f"Not changed: a password has {ADMIN_PASSWORD_LENGTH_MIN} to "
                                f"{SECRET_LENGTH_MAX} characters. Leave it empty to generate one.")
        changed = await panel.ctx.in_thread(admins_admin.set_admin_password, panel.store, target.username, password)
        if not changed:
            return panel.not_found(request, op, "admin user")
        ended = end_sessions(target.username)
        await panel.audit(op, "admin.users.password", f"admin:{target.username}", "ok",
                          detail=f"{'generated' if generated else 'typed'}; {ended} sessions ended")
        log.info("panel: %s reset the password of admin user %s (%d sessions ended)", op.username, target.username,
                 ended)
        if not generated:
            return panel.redirect(request, "/panel/admins", flash=f"Password of {target.username} changed; "
                                  "their sessions ended.")
        # Shown once, on this answer only (no-store): it is kept nowhere but in the store as a hash.
        return panel.render(request, op, "admins_password.html", username=target.username, password=password)


def _create_error(message: str) -> str:
    """msgspec's rule, in words (it names the field, never the value)."""
    if "`$.password`" in message:
        return f"Not created: the password needs {ADMIN_PASSWORD_LENGTH_MIN} to {SECRET_LENGTH_MAX} characters."
    if "`$.username`" in message:
        return "Not created: the username has 3 to 64 letters, digits or . _ @ -."
    if "`$.role`" in message:
        return "Not created: the role is Manager or Employee (an Admin cannot be created here)."
    return f"Not created: {message}."


def _text(form, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""
