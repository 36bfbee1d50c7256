"""Logins and what hangs off them: customer sessions with device pairing, admin sessions, admin
users, and the admin panel's views of customers.

Customer login (`POST /customers/sessions`, open) names a phone or an e-mail, which are unique per
partner only, so it checks the wPIN against every user holding that phone/e-mail (at most
LOGIN_CANDIDATES_MAX; an `Issuer-Code` header naming the partner narrows it to one). Every check is
one scrypt, and a login naming nobody still burns one against a dummy hash: the answer time does
not tell whether a phone is registered.

wPIN rate limit: `sessions.wpin_failures_max` wrong wPINs in a row lock a user's customer logins
for `sessions.wpin_lock_s`, durably (users.wpin_failures / wpin_locked_until), so a restart does not
hand out fresh guesses. A failure is charged *before* the scrypt check and refunded on success, so
concurrent guesses cannot overshoot the limit. While locked, even the right wPIN gets 429.

Device pairing: one active installation per (user, deviceId). A login from a new installation of
a device deactivates the older one and revokes that device's live sessions. Sessions themselves
are in memory (`RestContext.customer_sessions`, `admin_sessions`).

Admin login (`POST /admin/sessions`, open) is rate limited per username in memory (five wrong
passwords, then 429 for a minute). Admins create Managers and Employees, never other Admins: the
body's `role` only admits those two, so asking for an Admin is a 400 INVALID_PAYLOAD.

Both logins answer 201 Created (a session is a new resource).
"""

from __future__ import annotations

import collections
import datetime
import enum
import logging
import time
from collections.abc import Callable
from typing import Annotated, Literal

import attrs
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.config import SessionsConfig
from authsrv.rest.auth import AdminSubject, Caller, Channel, CustomerSubject, bearer_token
from authsrv.rest.context import (
    ALL_ROLES,
    Access,
    Call,
    Doc,
    RestContext,
    admin_route,
    customer_routes,
    invalid,
    json_response,
    route,
)
from authsrv.rest.errors import Title, problem
from authsrv.rest.lifecycle import WalletUser, wallet_user
from authsrv.store.db import (
    USERS_PAGE_MAX,
    AdminInfo,
    DeviceRow,
    Role,
    Store,
    StoreConflict,
    UserRow,
    verify_login_secret,
)

log = logging.getLogger("authsrv.rest")

# Users in these states may not open customer sessions (compared upper-cased). A deny list, not an
# allow list: partners choose their own states ("VERIFIED", "ACTIVE", ...).
LOGIN_REFUSED_STATES = frozenset({"BLOCKED", "DELETED", "CLOSED", "SUSPENDED", "INACTIVE", "LOCKED", "BANNED"})
ADMIN_LOGIN_FAILURES_MAX = 5
ADMIN_LOGIN_LOCK_S = 60
ADMIN_LOGIN_ENTRIES_MAX = 10_000  # usernames tracked; the least recently tried is forgotten first
ADMIN_PASSWORD_LENGTH_MIN = 12
SECRET_LENGTH_MAX = 256  # scrypt of a longer secret is no safer, only slower
LOGIN_NAME_LENGTH_MAX = 254
PARTNER_NAME_LENGTH_MAX = 64
PAGE_SIZE_DEFAULT = 20
PAGE_MAX = 1_000_000
ISSUER_CODE_HEADER = "issuer-code"

DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
# Login fields are bounded but otherwise free: a malformed phone or wPIN is simply wrong (401).
LoginName = Annotated[str, msgspec.Meta(min_length=1, max_length=LOGIN_NAME_LENGTH_MAX)]
LoginSecret = Annotated[str, msgspec.Meta(min_length=1, max_length=SECRET_LENGTH_MAX)]
NewUsername = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._@-]{3,64}$")]
NewPassword = Annotated[str, msgspec.Meta(min_length=ADMIN_PASSWORD_LENGTH_MIN, max_length=SECRET_LENGTH_MAX)]


# -- bodies ----------------------------------------------------------------------------------------


class CustomerLogin(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Exactly one of `phone`, `email`. `installationId` defaults to `deviceId`."""

    w_pin: LoginSecret = msgspec.field(name="wPIN")
    device_id: DeviceId = msgspec.field(name="deviceId")
    phone: LoginName | msgspec.UnsetType = msgspec.UNSET
    email: LoginName | msgspec.UnsetType = msgspec.UNSET
    installation_id: DeviceId | msgspec.UnsetType = msgspec.field(default=msgspec.UNSET, name="installationId")


class SessionToken(msgspec.Struct, rename="camel", frozen=True):
    token: str
    expires_in: int  # seconds


class AdminLogin(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    username: LoginName
    password: LoginSecret


class AdminToken(msgspec.Struct, rename="camel", frozen=True):
    token: str
    expires_in: int  # seconds
    role: str


class AdminUserCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    username: NewUsername
    password: NewPassword
    role: Literal["Manager", "Employee"]  # an Admin cannot be made over the API


class AdminUser(msgspec.Struct, rename="camel", frozen=True):
    username: str
    role: str
    created_by: str
    created_at: str


class AdminUsers(msgspec.Struct, frozen=True):
    users: list[AdminUser]


class Device(msgspec.Struct, rename="camel", frozen=True):
    device_id: str
    installation_id: str
    paired_at: str


class Devices(msgspec.Struct, frozen=True):
    devices: list[Device]


class AdminCustomer(WalletUser, frozen=True):
    """A user as the admin panel sees it: the wallet view plus its partner."""

    partner: str


class CustomerPage(msgspec.Struct, rename="camel", frozen=True):
    items: list[AdminCustomer]
    page: int
    page_size: int
    total: int


_customer_login_decoder = msgspec.json.Decoder(CustomerLogin)
_admin_login_decoder = msgspec.json.Decoder(AdminLogin)
_admin_user_decoder = msgspec.json.Decoder(AdminUserCreate)


def admin_customer(row: UserRow) -> AdminCustomer:
    return AdminCustomer(**msgspec.structs.asdict(wallet_user(row)), partner=row.partner)


def admin_user(info: AdminInfo) -> AdminUser:
    return AdminUser(username=info.username, role=info.role.value, created_by=info.created_by,
                     created_at=info.created_at)


def device(row: DeviceRow) -> Device:
    return Device(device_id=row.device_id, installation_id=row.installation_id, paired_at=row.created_at)


# -- customer login (plain functions, run in a store thread) ---------------------------------------


class LoginOutcome(enum.IntEnum):  # never renumber
    ok = 0
    invalid_credentials = 1
    locked = 2
    ambiguous = 3  # the wPIN fits users of several partners: send Issuer-Code
    not_active = 4


@attrs.frozen
class LoginResult:
    outcome: LoginOutcome
    user: UserRow | None = None
    retry_after_s: int = 0


def check_customer_login(store: Store, *, phone: str, email: str, partner: str | None, w_pin: str,
                         failures_max: int, lock_s: int, now: datetime.datetime) -> LoginResult:
    """Who a customer login is, or why not. Blocking (scrypt, fsync): call from a worker thread."""
    candidates = store.users_by_login(phone=phone, email=email, partner=partner)
    claim = store.claim_wpin_attempts([user.id for user in candidates], failures_max=failures_max,
                                      lock_s=lock_s, now=now)
    admitted = set(claim.admitted)
    # One scrypt per candidate, at least one: locked, PIN-less and unknown logins cost a real check.
    checked = [(user, verify_login_secret(user.wpin_hash if user.id in admitted else "", w_pin))
               for user in candidates]  # fmt: skip
    if not candidates:
        verify_login_secret("", w_pin)
    matches = [user for user, right in checked if right]
    assert all(user.id in admitted for user in matches)
    if len(matches) == 1:
        (user,) = matches
        store.settle_wpin_success(user.id, [other for other in claim.admitted if other != user.id],
                                  failures_max=failures_max)
        if user.state.upper() in LOGIN_REFUSED_STATES:
            return LoginResult(LoginOutcome.not_active, user)
        return LoginResult(LoginOutcome.ok, user)
    if matches:
        store.settle_wpin_success(None, claim.admitted, failures_max=failures_max)
        return LoginResult(LoginOutcome.ambiguous)
    if claim.locked:
        return LoginResult(LoginOutcome.locked, retry_after_s=claim.retry_after_s)
    return LoginResult(LoginOutcome.invalid_credentials)


# -- admin login rate limit (in memory) ------------------------------------------------------------


@attrs.define
class _Attempts:
    failures: int
    locked_until: float  # clock seconds; 0 = not locked


class AttemptLimiter:
    """Failures in a row per key (an admin username), charged before the password check.

    In memory and bounded: the least recently tried key is forgotten past `entries_max`."""

    def __init__(self, *, failures_max: int, lock_s: float, entries_max: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert failures_max >= 1 and lock_s > 0 and entries_max >= 1
        self.failures_max = failures_max
        self.lock_s = lock_s
        self.entries_max = entries_max
        self.clock = clock
        self._entries: collections.OrderedDict[str, _Attempts] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: str) -> float:
        """0 when an attempt may go ahead (and is charged), else the seconds until it may."""
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and entry.locked_until > now:
            return entry.locked_until - now
        if entry is None or entry.locked_until:
            entry = _Attempts(0, 0.0)  # new key, or its lock has elapsed: a fresh run
        entry.failures += 1
        if entry.failures >= self.failures_max:
            entry.locked_until = now + self.lock_s  # in effect from the next attempt on
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.entries_max:
            self._entries.popitem(last=False)
        return 0.0

    def succeeded(self, key: str) -> None:
        self._entries.pop(key, None)


# -- what other modules call -----------------------------------------------------------------------


def revoke_customer(ctx: RestContext, customer_id: int) -> int:
    """End every live session of a customer (wPIN changed, user blocked); how many there were."""
    revoked = ctx.customer_sessions.revoke_where(lambda subject: subject.customer_id == customer_id)
    if revoked:
        log.info("revoked %d session(s) of customer %d", revoked, customer_id)
    return revoked


def _revoke_device(ctx: RestContext, customer_id: int, device_id: str) -> int:
    return ctx.customer_sessions.revoke_where(
        lambda subject: subject.customer_id == customer_id and subject.device_id == device_id)


def create_admin_user(store: Store, body: AdminUserCreate, *, created_by: str) -> AdminInfo:
    """A new Manager or Employee (`body` already validated as AdminUserCreate: username pattern,
    password length, role). Blocking (scrypt, commit); StoreConflict when the username is taken.
    `POST /admin/users` and the panel's admin users page both call it."""
    return store.create_admin(body.username, Role(body.role), body.password, created_by=created_by)


def too_many_attempts(retry_after_s: float, detail: str) -> Response:
    response = problem(429, Title.TOO_MANY_ATTEMPTS, detail)
    response.headers["retry-after"] = str(max(1, int(-(-retry_after_s // 1))))
    return response


# -- routes ----------------------------------------------------------------------------------------


class SessionsApi:
    def __init__(self, ctx: RestContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.settings: SessionsConfig = ctx.config.sessions if ctx.config is not None else SessionsConfig()
        self.admin_attempts = AttemptLimiter(failures_max=ADMIN_LOGIN_FAILURES_MAX, lock_s=ADMIN_LOGIN_LOCK_S,
                                             entries_max=ADMIN_LOGIN_ENTRIES_MAX)

    def routes(self) -> list[Route]:
        ctx = self.ctx
        admin_only = frozenset({Role.admin})
        return [
            route("/customers/sessions", self.customer_login, methods=["POST"], name="customer.session.create",
                  channel=None, doc=Doc("Customer login: a session token for the mobile app", body=CustomerLogin,
                                        response=SessionToken, status=201, problems=(401, 403, 409, 429))),
            route("/customers/me/session", self.customer_logout, methods=["DELETE"], name="customer.session.delete",
                  channel=Channel.customer, doc=Doc("Log out: end this session token", status=204, problems=())),
            *customer_routes(ctx, "", self.get_me, method="GET", access=Access(customer=True), name="me.get",
                             doc=Doc("The session's user", response=WalletUser)),
            *customer_routes(ctx, "/devices", self.list_devices, method="GET", access=Access(customer=True),
                             name="devices.list", doc=Doc("The user's paired devices", response=Devices)),
            *customer_routes(ctx, "/devices/{deviceId}", self.unpair_device, method="DELETE",
                             access=Access(customer=True), name="devices.delete",
                             doc=Doc("Unpair a device and end its sessions", status=204)),
            route("/admin/sessions", self.admin_login, methods=["POST"], name="admin.session.create", channel=None,
                  doc=Doc("Admin login: a session token for the admin panel", body=AdminLogin, response=AdminToken,
                          status=201, problems=(401, 429))),
            admin_route("/admin/sessions/current", self.admin_logout, method="DELETE", roles=ALL_ROLES,
                        name="session.delete", doc=Doc("Log out: end this admin session token", status=204,
                                                       problems=())),
            admin_route("/admin/users", self.create_admin, method="POST", roles=admin_only, name="users.create",
                        doc=Doc("Create a Manager or Employee", body=AdminUserCreate, response=AdminUser,
                                status=201, problems=(409,))),
            admin_route("/admin/users", self.list_admins, method="GET", roles=admin_only, name="users.list",
                        doc=Doc("List admin users", response=AdminUsers, problems=())),
            admin_route("/admin/customers", self.list_customers, method="GET", roles=ALL_ROLES,
                        name="customers.list", doc=Doc("List customers (?partner=&page=&pageSize=)",
                                                       response=CustomerPage, problems=())),
            *customer_routes(ctx, "", self.get_customer, method="GET", access=Access(admin=ALL_ROLES),
                             name="customer.get", doc=Doc("A customer, with its partner", response=AdminCustomer)),
        ]

    # -- customers ---------------------------------------------------------------------------------

    async def customer_login(self, request: Request) -> Response:
        try:
            body = _customer_login_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        if (body.phone is msgspec.UNSET) == (body.email is msgspec.UNSET):
            return invalid("exactly one of `phone`, `email` is required")
        partner = request.headers.get(ISSUER_CODE_HEADER) or None
        if partner is not None and len(partner) > PARTNER_NAME_LENGTH_MAX:
            return invalid(f"`Issuer-Code` longer than {PARTNER_NAME_LENGTH_MAX} characters")
        result = await self.ctx.in_thread(
            check_customer_login, self.store, phone=body.phone or "", email=body.email or "", partner=partner,
            w_pin=body.w_pin, failures_max=self.settings.wpin_failures_max, lock_s=self.settings.wpin_lock_s,
            now=datetime.datetime.now(datetime.timezone.utc),
        )  # fmt: skip
        if result.outcome is not LoginOutcome.ok:
            return self._login_refused(result)
        user = result.user
        assert user is not None
        return await self._open_session(user, body.device_id, body.installation_id or body.device_id)

    def _login_refused(self, result: LoginResult) -> Response:
        log.info("customer login refused: %s", result.outcome.name)
        if result.outcome is LoginOutcome.locked:
            return too_many_attempts(result.retry_after_s, "too many wrong wPINs; customer logins are locked")
        if result.outcome is LoginOutcome.not_active:
            return problem(403, Title.CUSTOMER_NOT_ACTIVE, "the customer may not log in in its current state")
        if result.outcome is LoginOutcome.ambiguous:
            return problem(409, Title.ISSUER_CODE_REQUIRED,
                           "several wallets match; name the partner in the `Issuer-Code` header")
        assert result.outcome is LoginOutcome.invalid_credentials
        return problem(401, Title.INVALID_CREDENTIALS, "wrong phone/e-mail or wPIN")

    async def _open_session(self, user: UserRow, device_id: str, installation_id: str) -> Response:
        paired = await self.ctx.in_thread(self.store.pair_device, user.id, device_id, installation_id)
        # No await from here to `issue`: the old installation's sessions go before the new one starts.
        if paired.replaced_installation:
            revoked = _revoke_device(self.ctx, user.id, device_id)
            log.info("customer %d re-paired a device: %d old session(s) revoked", user.id, revoked)
        for evicted in paired.evicted_device_ids:
            _revoke_device(self.ctx, user.id, evicted)
        sessions = self.ctx.customer_sessions
        token = sessions.issue(CustomerSubject(customer_id=user.id, partner=user.partner, device_id=device_id))
        log.info("customer %d of %s opened a session", user.id, user.partner)
        return json_response(SessionToken(token=token, expires_in=int(sessions.ttl_s)), status=201)

    async def customer_logout(self, request: Request) -> Response:
        caller: Caller = request.state.caller
        token = bearer_token(request.scope)
        assert token is not None and caller.channel is Channel.customer
        self.ctx.customer_sessions.revoke(token)
        return Response(status_code=204)

    async def get_me(self, request: Request, call: Call) -> Response:
        return json_response(wallet_user(call.user))

    async def list_devices(self, request: Request, call: Call) -> Response:
        rows = await self.ctx.in_thread(self.store.devices_of_user, call.user.id)
        return json_response(Devices(devices=[device(row) for row in rows]))

    async def unpair_device(self, request: Request, call: Call) -> Response:
        device_id = request.path_params["deviceId"]
        if not _is_device_id(device_id) or not await self.ctx.in_thread(
                self.store.unpair_device, call.user.id, device_id):
            return problem(404, Title.DEVICE_NOT_FOUND, "no such paired device")
        revoked = _revoke_device(self.ctx, call.user.id, device_id)
        log.info("customer %d unpaired a device: %d session(s) revoked", call.user.id, revoked)
        return Response(status_code=204)

    # -- admins ------------------------------------------------------------------------------------

    async def admin_login(self, request: Request) -> Response:
        try:
            body = _admin_login_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        wait_s = self.admin_attempts.claim(body.username)
        if wait_s:
            log.info("admin login refused: locked")
            return too_many_attempts(wait_s, "too many wrong passwords for this username; try later")
        admin = await self.ctx.in_thread(self.store.check_admin_password, body.username, body.password)
        if admin is None:
            log.info("admin login refused: invalid credentials")
            return problem(401, Title.INVALID_CREDENTIALS, "wrong username or password")
        self.admin_attempts.succeeded(body.username)
        sessions = self.ctx.admin_sessions
        token = sessions.issue(AdminSubject(username=admin.username, role=admin.role))
        log.info("admin %s (%s) opened a session", admin.username, admin.role)
        return json_response(AdminToken(token=token, expires_in=int(sessions.ttl_s), role=admin.role.value),
                             status=201)

    async def admin_logout(self, request: Request, caller: Caller) -> Response:
        token = bearer_token(request.scope)
        assert token is not None
        self.ctx.admin_sessions.revoke(token)
        return Response(status_code=204)

    async def create_admin(self, request: Request, caller: Caller) -> Response:
        try:
            body = _admin_user_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        assert caller.role is Role.admin and caller.admin
        try:
            info = await self.ctx.in_thread(create_admin_user, self.store, body, created_by=caller.admin)
        except StoreConflict:
            return problem(409, Title.ADMIN_ALREADY_EXISTS, "an admin user with this username exists")
        log.info("admin %s created admin user %s (%s)", caller.admin, info.username, info.role)
        return json_response(admin_user(info), status=201)

    async def list_admins(self, request: Request, caller: Caller) -> Response:
        infos = await self.ctx.in_thread(self.store.admins)
        return json_response(AdminUsers(users=[admin_user(info) for info in infos]))

    async def get_customer(self, request: Request, call: Call) -> Response:
        return json_response(admin_customer(call.user))

    async def list_customers(self, request: Request, caller: Caller) -> Response:
        query = request.query_params
        partner = query.get("partner") or None
        if partner is not None and len(partner) > PARTNER_NAME_LENGTH_MAX:
            return invalid(f"`partner` longer than {PARTNER_NAME_LENGTH_MAX} characters")
        page = _int_param(query.get("page"), default=1, low=1, high=PAGE_MAX)
        page_size = _int_param(query.get("pageSize"), default=PAGE_SIZE_DEFAULT, low=1, high=USERS_PAGE_MAX)
        if page is None or page_size is None:
            return invalid(f"`page` must be 1..{PAGE_MAX}, `pageSize` 1..{USERS_PAGE_MAX}")
        rows, total = await self.ctx.in_thread(self.store.users_page, partner=partner,
                                               offset=(page - 1) * page_size, limit=page_size)
        return json_response(CustomerPage(items=[admin_customer(row) for row in rows], page=page,
                                          page_size=page_size, total=total))


def _int_param(text: str | None, *, default: int, low: int, high: int) -> int | None:
    if text is None or text == "":
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    value = int(text)
    return value if low <= value <= high else None


def _is_device_id(text: str) -> bool:
    return 1 <= len(text) <= 128 and text.isascii() and all(c.isalnum() or c in "._:-" for c in text)
