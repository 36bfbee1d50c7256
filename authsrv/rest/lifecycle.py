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
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.rest import money
from authsrv.rest.auth import Channel
from authsrv.rest.context import Doc, RestContext, customer_not_found, invalid, json_response, parse_id, route
from authsrv.store.db import UserRow, hash_secret

log = logging.getLogger("authsrv.rest")

NAME_LENGTH_MAX = 64
EMAIL_LENGTH_MAX = 254  # RFC 5321 path limit

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


def wallet_user(row: UserRow) -> WalletUser:
    return WalletUser(
        customer_id=row.id, first_name=row.first_name, last_name=row.last_name, phone=row.phone,
        email=row.email, birth_date=row.birth_date, state=row.state, kyc=row.kyc,
        created_at=row.created_at,
    )  # fmt: skip


def user_event(row: UserRow) -> dict:
    """The event body of a user change: ids and states, no personal data beyond what changed."""
    return {"customerId": row.id, "state": row.state, "kyc": row.kyc}


class LifecycleApi:
    """`kyc_success_hooks`: each `hook(user) -> list[AccountSpec]` runs in the store thread, inside
    the transaction that turns the user's kyc to SUCCESS (e.g. to open the program's default
    balance); the ledger accounts it returns are created right after the commit."""

    def __init__(self, ctx: RestContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.kyc_success_hooks: list = []

    def routes(self) -> list[Route]:
        partner = Channel.partner
        return [
            route("/lifecycle/v1/wallet", self.create, methods=["POST"], name="partner.wallet.create",
                  channel=partner, doc=Doc("Create a user (wallet)", body=WalletCreate,
                                           response=CustomerCreated, status=201, problems=())),
            route("/lifecycle/v1/wallet/{customerId}", self.get, methods=["GET"], name="partner.wallet.get",
                  channel=partner, doc=Doc("Get a user", response=WalletUser)),
            route("/lifecycle/v1/wallet/{customerId}", self.update, methods=["PUT"], name="partner.wallet.update",
                  channel=partner, doc=Doc("Update some fields of a user", body=WalletUpdate, response=WalletUser)),
        ]

    async def create(self, request: Request) -> Response:
        partner = request.state.partner
        try:
            body = _create_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        if body.kyc == "SUCCESS":
            money.check_writable(self.ctx.ledger)  # before the store: its ledger accounts could not follow
        row, accounts = await self.ctx.in_thread(self._create_user, partner, body)
        await self._create_accounts(accounts)
        assert row.partner == partner
        log.info("partner %s created customer %d", partner, row.id)
        return json_response(CustomerCreated(customer_id=row.id), status=201)

    def _create_user(self, partner: str, body: WalletCreate) -> tuple[UserRow, list]:
        accounts: list = []
        with self.store.transaction():
            row = self.store.create_user(
                partner=partner, first_name=body.first_name, last_name=body.last_name, phone=body.phone,
                email=body.email, birth_date=body.birth_date, state=body.state, kyc=body.kyc,
                wpin_hash=hash_secret(body.w_pin),
            )  # fmt: skip
            self.store.append_event(partner, "user.created", f"customer:{row.id}", user_event(row))
            if row.kyc == "SUCCESS":
                accounts = self._kyc_succeeded(row)
        return row, accounts

    async def get(self, request: Request) -> Response:
        row = await self._own_user(request)
        return customer_not_found() if row is None else json_response(wallet_user(row))

    async def update(self, request: Request) -> Response:
        try:
            body = _update_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        row = await self._own_user(request)
        if row is None:
            return customer_not_found()
        fields = {column: getattr(body, name) for name, column in _UPDATE_COLUMNS.items()
                  if getattr(body, name) is not msgspec.UNSET}  # fmt: skip
        if fields.get("kyc") == "SUCCESS":
            money.check_writable(self.ctx.ledger)  # before the store: its ledger accounts could not follow
        updated, accounts = await self.ctx.in_thread(self._update_user, row, fields, body.w_pin)
        await self._create_accounts(accounts)
        if body.w_pin is not msgspec.UNSET or (updated is not None and updated.state != row.state):
            from authsrv.rest.sessions_api import revoke_customer  # (sessions_api imports this module)

            revoke_customer(self.ctx, row.id)  # a changed wPIN or state ends the app's sessions
        if updated is None:  # deleted in between; there is no delete today, but say so honestly
            return customer_not_found()
        assert updated.id == row.id and updated.partner == row.partner
        log.info("partner %s updated customer %d: %s", row.partner, row.id,
                 ",".join(sorted(fields) + (["wpin"] if body.w_pin is not msgspec.UNSET else [])))
        return json_response(wallet_user(updated))

    def _update_user(self, before: UserRow, fields: dict[str, str], w_pin) -> tuple[UserRow | None, list]:
        if w_pin is not msgspec.UNSET:
            fields = {**fields, "wpin_hash": hash_secret(w_pin)}
        accounts: list = []
        with self.store.transaction():
            updated = self.store.update_user(before.id, **fields)
            if updated is None:
                return None, accounts
            self.store.append_event(updated.partner, "user.updated", f"customer:{updated.id}",
                                    {**user_event(updated), "fields": sorted(fields)})
            if updated.kyc != before.kyc:
                self.store.append_event(updated.partner, "kyc.changed", f"customer:{updated.id}",
                                        {"customerId": updated.id, "kyc": updated.kyc, "previous": before.kyc})
                if updated.kyc == "SUCCESS":
                    accounts = self._kyc_succeeded(updated)
        return updated, accounts

    def _kyc_succeeded(self, user: UserRow) -> list:
        return [spec for hook in self.kyc_success_hooks for spec in hook(user)]

    async def _create_accounts(self, accounts: list) -> None:
        if accounts and self.ctx.ledger is not None:
            await money.submit(self.ctx.ledger, accounts=accounts)

    async def _own_user(self, request: Request) -> UserRow | None:
        """The user in the path if it belongs to the calling partner, else None (a 404 either way)."""
        customer_id = parse_id(request.path_params["customerId"])
        if customer_id is None:
            return None
        row = await self.ctx.in_thread(self.store.get_user, customer_id)
        if row is None or row.partner != request.state.partner:
            return None
        return row
