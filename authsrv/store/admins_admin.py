"""Admin users as the panel's Admin manages them: the list with the `disabled` flag, disabling and
enabling, and a new password. Writes run inside `store.transaction()` (they replicate in cluster
mode); `Store.check_admin_password` refuses a disabled admin. Blocking: call from a worker thread.
Creating one is `authsrv.rest.sessions_api.create_admin_user` (the REST `POST /admin/users` code).
"""

from __future__ import annotations

import attrs

from authsrv.store.db import ADMINS_LIST_MAX, Role, Store, hash_secret


@attrs.frozen
class AdminListed:
    username: str
    role: Role
    created_by: str
    created_at: str
    disabled: bool


def admins_with_state(store: Store) -> list[AdminListed]:
    """Every admin (at most ADMINS_LIST_MAX), by username; never the hash."""
    with store.locked():
        rows = store.db.execute(
            "SELECT username, role, created_by, created_at, disabled FROM admins ORDER BY username LIMIT ?",
            (ADMINS_LIST_MAX,)).fetchall()
    return [AdminListed(row[0], Role(row[1]), row[2], row[3], bool(row[4])) for row in rows]


def admin_listed(store: Store, username: str) -> AdminListed | None:
    with store.locked():
        row = store.db.execute(
            "SELECT username, role, created_by, created_at, disabled FROM admins WHERE username = ?",
            (username,)).fetchone()
    return AdminListed(row[0], Role(row[1]), row[2], row[3], bool(row[4])) if row else None


def set_admin_disabled(store: Store, username: str, disabled: bool) -> bool:
    """Disable or enable a Manager or Employee (never an Admin); False when there is none."""
    with store.transaction():
        updated = store.db.execute(
            "UPDATE admins SET disabled = ? WHERE username = ? AND role != ?",
            (int(disabled), username, str(Role.admin))).rowcount
    return bool(updated)


def set_admin_password(store: Store, username: str, password: str) -> bool:
    """A new password for a Manager or Employee (never an Admin); False when there is none. The
    hash (scrypt) is made before the store lock is taken."""
    password_hash = hash_secret(password)
    with store.transaction():
        updated = store.db.execute(
            "UPDATE admins SET password_hash = ? WHERE username = ? AND role != ?",
            (password_hash, username, str(Role.admin))).rowcount
    return bool(updated)
