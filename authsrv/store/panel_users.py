"""Read queries of the panel's Users and Cards pages (authsrv/panel/views/users.py, cards.py).

Plain functions taking the Store, each one bounded: a page of users, a user's KYC forms, a card's
audit entries. Nothing here writes; changes go through the domain code the REST API calls.

User search (`search_users`): the text is matched as

    a customer id        exactly (the primary key)
    a phone, an e-mail   exactly, on every user (the phone and e-mail indexes), and as a substring
    a name               first name, last name or "first last", case-insensitive substring

Substring matches scan the newest `SEARCH_SCAN_MAX` users only (newest first, stopping at the page),
so a search costs the same however many users there are; exact id, phone and e-mail matches reach
every user.
"""

from __future__ import annotations

from authsrv.store.db import (
    _CARD_COLUMNS,
    _EVENT_COLUMNS,
    _USER_COLUMNS,
    AuditEntry,
    CardRow,
    EventRow,
    KycFormRow,
    Store,
    UserRow,
    _card_row,
)

USERS_PAGE_SIZE = 25
USERS_PAGES_MAX = 200  # offset bound: 5,000 rows deep
SEARCH_SCAN_MAX = 100_000  # newest users a substring search looks at (about 0.1 s with the store lock held)
SEARCH_TEXT_MAX = 100
KYC_FORMS_SHOWN_MAX = 50
CARD_AUDIT_SCAN_MAX = 100_000  # newest audit entries a card's history looks at
CARD_AUDIT_SHOWN_MAX = 50
CARD_EVENTS_SCAN_MAX = 100_000  # newest partner events a card's history looks at
CARD_EVENTS_SHOWN_MAX = 50
CARDS_SHOWN_MAX = 200
_KYC_FORM_COLUMNS = (
    "id, user_id, partner, state, fields_json, images_json, created_at, decided_at, decided_by, reason"
)
_AUDIT_COLUMNS = "id, at, actor, role, channel, action, target, outcome, before_json, after_json, detail"


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _phone_digits(text: str) -> str:
    """'+48 900-000 001' -> '48900000001'; '' when the text is not phone-like."""
    stripped = text.replace(" ", "").replace("-", "").replace("(", "").replace(")", "")
    stripped = stripped.removeprefix("+")
    return stripped if stripped.isascii() and stripped.isdigit() else ""


def search_users(store: Store, text: str, *, page: int = 1,
                 page_size: int = USERS_PAGE_SIZE) -> tuple[list[UserRow], bool]:
    """One page of users matching `text`, newest first, and whether there are more."""
    assert 1 <= page <= USERS_PAGES_MAX and 1 <= page_size <= 100
    text = text.strip()[:SEARCH_TEXT_MAX]
    if not text:
        return newest_users(store, page=page, page_size=page_size)
    pattern = f"%{_like_escape(text)}%"
    exact = ["phone = ?", "email = ?", "email = ?"]
    exact_values: list[object] = [text, text, text.lower()]
    digits = _phone_digits(text)
    if digits:
        exact.append("phone = ?")
        exact_values.append(digits)
        if len(digits) <= 19 and int(digits) <= 2**63 - 1:
            exact.append("id = ?")
            exact_values.append(int(digits))
    substring = ["first_name LIKE ? ESCAPE '\\'", "last_name LIKE ? ESCAPE '\\'",
                 "(first_name || ' ' || last_name) LIKE ? ESCAPE '\\'", "email LIKE ? ESCAPE '\\'",
                 "phone LIKE ? ESCAPE '\\'"]
    substring_values: list[object] = [pattern] * 5
    if digits and digits != text:
        substring.append("phone LIKE ? ESCAPE '\\'")
        substring_values.append(f"%{_like_escape(digits)}%")
    offset = (page - 1) * page_size
    # One indexed lookup per exact term and one bounded scan for the substrings, as a UNION (an OR
    # across them would make SQLite scan the whole table).
    parts = [f"SELECT {_USER_COLUMNS} FROM users WHERE {term}" for term in exact]
    parts.append(f"SELECT {_USER_COLUMNS} FROM users WHERE id > ? AND ({' OR '.join(substring)})")
    with store._lock:
        (newest,) = store._conn.execute("SELECT COALESCE(MAX(id), 0) FROM users").fetchone()
        rows = store._conn.execute(
            " UNION ".join(parts) + " ORDER BY id DESC LIMIT ? OFFSET ?",
            (*exact_values, newest - SEARCH_SCAN_MAX, *substring_values, page_size + 1, offset),
        ).fetchall()
    users = [UserRow(*row) for row in rows]
    return users[:page_size], len(users) > page_size


def newest_users(store: Store, *, page: int = 1, page_size: int = USERS_PAGE_SIZE) -> tuple[list[UserRow], bool]:
    assert 1 <= page <= USERS_PAGES_MAX and 1 <= page_size <= 100
    with store._lock:
        rows = store._conn.execute(
            f"SELECT {_USER_COLUMNS} FROM users ORDER BY id DESC LIMIT ? OFFSET ?",
            (page_size + 1, (page - 1) * page_size),
        ).fetchall()
    users = [UserRow(*row) for row in rows]
    return users[:page_size], len(users) > page_size


def kyc_forms_of_user(store: Store, user_id: int, *, limit: int = KYC_FORMS_SHOWN_MAX) -> list[KycFormRow]:
    """The user's KYC forms, newest first."""
    with store._lock:
        rows = store._conn.execute(
            f"SELECT {_KYC_FORM_COLUMNS} FROM kyc_forms WHERE user_id = ? ORDER BY id DESC LIMIT ?",
            (user_id, limit),
        ).fetchall()
    return [KycFormRow(*row) for row in rows]


def cards_of_user(store: Store, user_id: int, *, limit: int = CARDS_SHOWN_MAX) -> list[CardRow]:
    """Every card of the user, removed and not-yet-linked ones too (an operator sees them all)."""
    with store._lock:
        rows = store._conn.execute(
            f"SELECT {_CARD_COLUMNS} FROM cards WHERE user_id = ? ORDER BY id LIMIT ?", (user_id, limit),
        ).fetchall()
    return [_card_row(row) for row in rows]


def card_audit(store: Store, card_id: int, *, limit: int = CARD_AUDIT_SHOWN_MAX) -> list[AuditEntry]:
    """Audit entries about one card, newest first: the panel's (target `card:ID`, or a refused
    POST to /panel/cards/ID/...) and the admin API's (/admin/.../cards/ID...), among the newest
    `CARD_AUDIT_SCAN_MAX` entries."""
    with store._lock:
        (newest,) = store._conn.execute("SELECT COALESCE(MAX(id), 0) FROM audit_log").fetchone()
        rows = store._conn.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE id > ? AND (target = ? OR target LIKE ? ESCAPE '\\'"
            " OR target LIKE ? ESCAPE '\\') ORDER BY id DESC LIMIT ?",
            (newest - CARD_AUDIT_SCAN_MAX, card_target(card_id), f"%/cards/{card_id}/%", f"%/cards/{card_id}",
             limit),
        ).fetchall()
    return [AuditEntry(*row) for row in rows]


def card_events(store: Store, card_id: int, *, limit: int = CARD_EVENTS_SHOWN_MAX) -> list[EventRow]:
    """The card's lifecycle events (created, locked, unlocked, limits set, ... by any channel: the
    customer's app, the partner, the panel), newest first, among the newest `CARD_EVENTS_SCAN_MAX`."""
    with store._lock:
        (newest,) = store._conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
        rows = store._conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE id > ? AND subject = ? ORDER BY id DESC LIMIT ?",
            (newest - CARD_EVENTS_SCAN_MAX, card_target(card_id), limit),
        ).fetchall()
    return [EventRow(*row) for row in rows]


def card_target(card_id: int) -> str:
    """The audit target of a panel card action (the event subject's form)."""
    return f"card:{card_id}"
