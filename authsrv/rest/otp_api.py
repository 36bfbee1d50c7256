"""3DS challenges (partner channel): create one, the OTP goes to the partner, then verify it.

    POST /secure/3ds/challenges               {"cardId", "customerId"?, "amount", "currency", "merchantName"}
                                              -> 201 {"challengeId", "expiresAt"}
    POST /secure/3ds/challenges/{id}/verify   {"otp"} -> 200 {"status": "VERIFIED"}
                                              wrong: 422 OTP_INVALID; the last allowed wrong try and every
                                              try after it: 422 CHALLENGE_FAILED; expired: 410 CHALLENGE_EXPIRED

The OTP (6 digits, `secrets`) is sent as `POST {api_url}/notifications/otp` ("3DS External OTP
Notifier"), JWE-encrypted (RSA-OAEP-256, A256GCM) to the key of the partner's `GET /public-key`
(cached an hour), through the outbox (retries, same key). The partner must list "otp" in `notify`.
Neither the OTP nor its HMAC is ever logged.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.notify.otp import MERCHANT_NAME_LENGTH_MAX, OTP_DIGITS, Challenge, OtpStore, VerifyResult, load_or_create_mac_key
from authsrv.notify.partner_http import PUBLIC_KEY_TTL_S, PartnerClient
from authsrv.rest.auth import Caller, Channel
from authsrv.rest.context import Doc, RestContext, invalid, json_response, parse_id, route
from authsrv.rest.errors import Title, problem
from authsrv.rest.jwe import JweProblem
from authsrv.store.db import card_visible

log = logging.getLogger("authsrv.rest")

AMOUNT_MINOR_MAX = 10**12
PUBLIC_KEY_FETCH_TIMEOUT_S = 5.0
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


class ChallengeCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    card_id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    amount: Annotated[int, msgspec.Meta(ge=1, le=AMOUNT_MINOR_MAX)]
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
    merchant_name: Annotated[str, msgspec.Meta(min_length=1, max_length=MERCHANT_NAME_LENGTH_MAX, pattern=_PRINTABLE)]
    customer_id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None


class ChallengeCreated(msgspec.Struct, frozen=True, rename="camel"):
    challenge_id: int
    expires_at: str


class ChallengeVerify(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    otp: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]


class ChallengeStatus(msgspec.Struct, frozen=True):
    status: str


_create_decoder = msgspec.json.Decoder(ChallengeCreate)
_verify_decoder = msgspec.json.Decoder(ChallengeVerify)


def _iso_ms(moment_ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(moment_ms / 1000, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class OtpApi:
    def __init__(self, ctx: RestContext) -> None:
        self.ctx = ctx
        self.otp = OtpStore(ctx.store, load_or_create_mac_key(ctx.data_dir)) if ctx.data_dir is not None else None
        self._public_keys: dict[str, tuple[str, float]] = {}

    def routes(self) -> list[Route]:
        if self.otp is None or self.ctx.jwe is None:
            return []
        return [
            route("/secure/3ds/challenges", self.create, methods=["POST"], name="partner.3ds.create",
                  channel=Channel.partner,
                  doc=Doc("Create a 3DS challenge: a 6-digit OTP goes to the partner's /notifications/otp",
                          body=ChallengeCreate, response=ChallengeCreated, status=201, problems=(400, 404, 409, 503))),
            route("/secure/3ds/challenges/{challengeId}/verify", self.verify, methods=["POST"],
                  name="partner.3ds.verify", channel=Channel.partner,
                  doc=Doc("Check the OTP of a 3DS challenge", body=ChallengeVerify, response=ChallengeStatus,
                          problems=(400, 404, 410, 422))),
        ]

    async def create(self, request: Request) -> Response:
        caller: Caller = request.state.caller
        try:
            body = _create_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        partner = self.ctx.partner_config(caller.partner)
        if not partner.api_url or "otp" not in partner.notify:
            return problem(409, Title.OTP_NOT_CONFIGURED, 'the partner has no api_url with "otp" in notify')
        card = await self.ctx.in_thread(self.ctx.store.get_card, body.card_id)
        if (card is None or card.partner != caller.partner or not card_visible(card)
                or (body.customer_id is not None and card.user_id != body.customer_id)):
            return problem(404, Title.CARD_NOT_FOUND, "no such card")
        public_key = await self._partner_key(caller.partner, partner.api_url)
        if public_key is None:
            return problem(503, Title.OTP_NOTIFIER_UNAVAILABLE, "the partner's GET /public-key gave no usable key")
        config = self.ctx.config
        challenge: Challenge = await self.ctx.in_thread(
            self.otp.create, partner=caller.partner, user_id=card.user_id, card_id=card.id,
            balance_id=card.balance_id, amount=body.amount, currency=body.currency,
            merchant_name=body.merchant_name, ttl_s=config.otp.ttl_s, tries_max=config.delivery.tries_max,
            envelope=lambda plaintext: self.ctx.jwe.encrypt_response(plaintext, public_key))
        log.info("3ds challenge %d for card %d of %s", challenge.id, card.id, caller.partner)
        return json_response(ChallengeCreated(challenge_id=challenge.id, expires_at=_iso_ms(challenge.expires_at_ms)),
                             status=201)

    async def verify(self, request: Request) -> Response:
        caller: Caller = request.state.caller
        challenge_id = parse_id(request.path_params["challengeId"])
        try:
            body = _verify_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        if challenge_id is None:
            return problem(404, Title.CHALLENGE_NOT_FOUND, "no such challenge")
        failures_max = self.ctx.config.otp.failures_max
        result, challenge = await self.ctx.in_thread(self.otp.verify, challenge_id, caller.partner, body.otp,
                                                     failures_max=failures_max)
        if result is VerifyResult.verified:
            return json_response(ChallengeStatus(status="VERIFIED"))
        if result is VerifyResult.challenge_not_found:
            return problem(404, Title.CHALLENGE_NOT_FOUND, "no such challenge")
        if result is VerifyResult.challenge_expired:
            return problem(410, Title.CHALLENGE_EXPIRED, "the OTP has expired: create a new challenge")
        if result is VerifyResult.challenge_failed:
            return problem(422, Title.CHALLENGE_FAILED, f"{failures_max} wrong OTPs: the challenge has failed")
        assert result is VerifyResult.otp_invalid and challenge is not None
        left = max(0, failures_max - challenge.failures)
        return problem(422, Title.OTP_INVALID, f"wrong OTP ({OTP_DIGITS} digits); {left} tries left")

    async def _partner_key(self, name: str, api_url: str):
        """The partner's RSA key for JWE, cached for an hour; None when it cannot be had."""
        cached = self._public_keys.get(name)
        value = cached[0] if cached is not None and time.monotonic() - cached[1] < PUBLIC_KEY_TTL_S else None
        if value is None:
            client = PartnerClient(name, api_url, data_dir=self.ctx.data_dir, timeout_s=PUBLIC_KEY_FETCH_TIMEOUT_S)
            try:
                value = await client.public_key()
            finally:
                await client.close()
            if value is None:
                return None
        try:
            key = self.ctx.jwe.client_key({"public-key": value}, required=True)
        except JweProblem:
            log.warning("partner %s: GET /public-key is not a usable RSA key", name)
            self._public_keys.pop(name, None)
            return None
        self._public_keys[name] = (value, time.monotonic())
        return key
