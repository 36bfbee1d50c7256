"""`/lifecycle/v1/wallet`: a partner creates, reads and updates its users (wallets).

Store calls run in a worker thread (`trio.to_thread.run_sync`): a write commits with
`synchronous=FULL` (an fsync, milliseconds), the wPIN hash is scrypt (tens of ms of CPU), and the
store lock may be held by another thread; none of that may stall the event loop the ISO 8583
listener shares. A partner sees only its own users: someone else's customerId is a 404, exactly
like one that does not exist, so ids do not leak across partners.
"""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.rest.errors import Title, problem
from authsrv.store.db import Store, UserRow, hash_secret

log = logging.getLogger("authsrv.rest")

NAME_LENGTH_MAX = 64
EMAIL_LENGTH_MAX = 254  # RFC 5321 path limit
CUSTOMER_ID_MAX = 2**63 - 1  # SQLite INTEGER
STORE_THREADS_MAX = 4  # scrypt is ~16 MiB per call; more threads would only queue on the store lock

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_LENGTH_MAX)]
Phone = Annotated[str, msgspec.Meta(pattern=r"^\+?[0-9]{6,15}$")]  # E.164 digits
Email = Annotated[str, msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+$", max_length=EMAIL_LENGTH_MAX)]
BirthDate = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
WalletPin = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4,8}$")]
Code = Annotated[str, msgspec.Meta(pattern=r"^[A-Z_]{1,32}$")]  # state, kyc: e.g. VERIFIED, SUCCESS


class WalletCreate(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    first_name: Name
    last_name: Name
    phone: Phone
    email: Email
    birth_date: BirthDate
    w_pin: WalletPin = msgspec.field(name="wPIN")
    state: Code = "VERIFIED"
    kyc: Code = "PENDING"


class WalletUpdate(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    first_name: Name | msgspec.UnsetType = msgspec.UNSET
    last_name: Name | msgspec.UnsetType = msgspec.UNSET
    phone: Phone | msgspec.UnsetType = msgspec.UNSET
    email: Email | msgspec.UnsetType = msgspec.UNSET
    birth_date: BirthDate | msgspec.UnsetType = msgspec.UNSET
    w_pin: WalletPin | msgspec.UnsetType = msgspec.field(default=msgspec.UNSET, name="wPIN")
    state: Code | msgspec.UnsetType = msgspec.UNSET
    kyc: Code | msgspec.UnsetType = msgspec.UNSET


class CustomerCreated(msgspec.Struct, rename="camel", frozen=True):
    customer_id: int


class WalletUser(msgspec.Struct, rename="camel", frozen=True):
    """A user as a partner sees it: never the wPIN, not even its hash."""

    customer_id: int
    first_name: str
    last_name: str
    phone: str
    email: str
    birth_date: str
    state: str
    kyc: str
    created_at: str


# WalletUpdate field -> store column (the store's names are snake_case; w_pin is stored hashed).
_UPDATE_COLUMNS = {
    "first_name": "first_name", "last_name": "last_name", "phone": "phone", "email": "email",
    "birth_date": "birth_date", "state": "state", "kyc": "kyc",
}  # fmt: skip

_create_decoder = msgspec.json.Decoder(WalletCreate)
_update_decoder = msgspec.json.Decoder(WalletUpdate)
_encoder = msgspec.json.Encoder()


def wallet_user(row: UserRow) -> WalletUser:
    return WalletUser(
        customer_id=row.id, first_name=row.first_name, last_name=row.last_name, phone=row.phone,
        email=row.email, birth_date=row.birth_date, state=row.state, kyc=row.kyc,
        created_at=row.created_at,
    )  # fmt: skip


def _json(value: msgspec.Struct, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type="application/json")


def _invalid(error: msgspec.DecodeError) -> Response:
    # msgspec names the path and the rule (`Expected `str`, got `int` - at `$.phone``), never the
    # value, so the detail cannot echo a wPIN back.
    return problem(400, Title.INVALID_PAYLOAD, str(error))


def _not_found() -> Response:
    return problem(404, Title.CUSTOMER_NOT_FOUND, "no such customer")


def _parse_customer_id(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if 1 <= value <= CUSTOMER_ID_MAX else None


class LifecycleApi:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.limiter = trio.CapacityLimiter(STORE_THREADS_MAX)

    def routes(self) -> list[Route]:
        return [
            Route("/lifecycle/v1/wallet", self.create, methods=["POST"]),
            Route("/lifecycle/v1/wallet/{customerId}", self.get, methods=["GET"]),
            Route("/lifecycle/v1/wallet/{customerId}", self.update, methods=["PUT"]),
        ]

    async def _in_thread(self, function, *args, **kwargs):
        return await trio.to_thread.run_sync(lambda: function(*args, **kwargs), limiter=self.limiter)

    async def create(self, request: Request) -> Response:
        partner = request.state.partner
        try:
            body = _create_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return _invalid(error)
        row = await self._in_thread(self._create_user, partner, body)
        assert row.partner == partner
        log.info("partner %s created customer %d", partner, row.id)
        return _json(CustomerCreated(customer_id=row.id), status=201)

    def _create_user(self, partner: str, body: WalletCreate) -> UserRow:
        return self.store.create_user(
            partner=partner, first_name=body.first_name, last_name=body.last_name, phone=body.phone,
            email=body.email, birth_date=body.birth_date, state=body.state, kyc=body.kyc,
            wpin_hash=hash_secret(body.w_pin),
        )  # fmt: skip

    async def get(self, request: Request) -> Response:
        row = await self._own_user(request)
        return _not_found() if row is None else _json(wallet_user(row))

    async def update(self, request: Request) -> Response:
        try:
            body = _update_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return _invalid(error)
        row = await self._own_user(request)
        if row is None:
            return _not_found()
        fields = {column: getattr(body, name) for name, column in _UPDATE_COLUMNS.items()
                  if getattr(body, name) is not msgspec.UNSET}  # fmt: skip
        updated = await self._in_thread(self._update_user, row.id, fields, body.w_pin)
        if updated is None:  # deleted in between; there is no delete today, but say so honestly
            return _not_found()
        assert updated.id == row.id and updated.partner == row.partner
        log.info("partner %s updated customer %d: %s", row.partner, row.id,
                 ",".join(sorted(fields) + (["wpin"] if body.w_pin is not msgspec.UNSET else [])))
        return _json(wallet_user(updated))

    def _update_user(self, user_id: int, fields: dict[str, str], w_pin) -> UserRow | None:
        if w_pin is not msgspec.UNSET:
            fields = {**fields, "wpin_hash": hash_secret(w_pin)}
        return self.store.update_user(user_id, **fields)

    async def _own_user(self, request: Request) -> UserRow | None:
        """The user in the path if it belongs to the calling partner, else None (a 404 either way)."""
        customer_id = _parse_customer_id(request.path_params["customerId"])
        if customer_id is None:
            return None
        row = await self._in_thread(self.store.get_user, customer_id)
        if row is None or row.partner != request.state.partner:
            return None
        return row
