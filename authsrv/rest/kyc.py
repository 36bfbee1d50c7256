"""KYC verification forms: `/register` (customer and partner), admin review, the users.kyc flag.

The reference documents' quick start (step 2) posts a multipart form: text fields plus up to three
document images (`imageFace`, `imageFront`, `imageBack`). A submitted form is PENDING and the user's
kyc flag becomes PENDING (event `kyc.submitted`: the partner's `verificationInProgress`); an admin
(Admin, Manager) accepts it (kyc SUCCESS, `kyc.accepted`, the KYC success hooks open the program's
balance) or rejects it (kyc REJECTED, `kyc.rejected`). Employees may look, not decide or see images.

Personal data: the body is parsed in memory (never spooled to a temporary file), the images are
written encrypted (authsrv.store.kycfiles) before the form row commits, and logs carry ids only.
Problem details name the field and the rule, never the value.

Form states, one table: PENDING -> ACCEPTED | REJECTED; a decided form never changes again.
"""

from __future__ import annotations

import datetime
import enum
import logging
from typing import Annotated

import attrs
import msgspec
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.rest import money
from authsrv.rest.auth import Caller
from authsrv.rest.balances import auto_balance_hook
from authsrv.rest.audit import set_before
from authsrv.rest.context import Access, Call, Doc, RestContext, admin_route, customer_routes, invalid, \
    json_response, parse_id
from authsrv.rest.errors import KYC_BODY_BYTES_MAX, Title, problem
from authsrv.store.db import KYC_FORM_ACCEPTED, KYC_FORM_PENDING, KYC_FORM_REJECTED, KYC_FORMS_PAGE_MAX, \
    KycFormRow, Role, UserRow
from authsrv.store.kycfiles import IMAGE_FIELDS, KycFileError, KycFiles

log = logging.getLogger("authsrv.rest")

IMAGE_BYTES_MAX = 4 * 1024 * 1024
IMAGES_MAX = len(IMAGE_FIELDS)
TEXT_PART_BYTES_MAX = 1024  # one text field, before the per-field length rules
NAME_LENGTH_MAX = 64
REASON_LENGTH_MAX = 256
PAGE_LIMIT_DEFAULT = 50
BIRTH_YEAR_MIN = 1900
assert IMAGES_MAX * IMAGE_BYTES_MAX < KYC_BODY_BYTES_MAX, "the body bound must fit every image"

KYC_SUCCESS = "SUCCESS"
KYC_PENDING = "PENDING"
KYC_REJECTED = "REJECTED"
FORM_STATES = (KYC_FORM_PENDING, KYC_FORM_ACCEPTED, KYC_FORM_REJECTED)
# The partner notification's status for each event (reference documents, "External verification Notifier").
NOTIFIED_STATUS = {"kyc.submitted": "IN_PROGRESS", "kyc.accepted": "ACCEPTED", "kyc.rejected": "REJECTED"}

REVIEWERS = frozenset({Role.admin, Role.manager, Role.employee})
DECIDERS = frozenset({Role.admin, Role.manager})

# ISO 3166-1 alpha-2, the 249 officially assigned codes.
COUNTRIES = frozenset("""
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV
BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES
ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE
IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY
MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU
NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM
SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE
VG VI VN VU WF WS YE YT ZA ZM ZW
""".split())
assert len(COUNTRIES) == 249

_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters (log and CSV injection, terminal escapes)
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_LENGTH_MAX, pattern=_PRINTABLE)]
Text = Annotated[str, msgspec.Meta(max_length=NAME_LENGTH_MAX, pattern=_PRINTABLE)]
Short = Annotated[str, msgspec.Meta(max_length=16, pattern=_PRINTABLE)]
IsoDate = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
OptionalDate = Annotated[str, msgspec.Meta(pattern=r"^([0-9]{4}-[0-9]{2}-[0-9]{2})?$")]
Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
DocumentType = Annotated[str, msgspec.Meta(pattern=r"^(passport|id_card|driving_license)$")]
DocumentNumber = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9 -]{0,31}$")]
Pesel = Annotated[str, msgspec.Meta(pattern=r"^([0-9]{11})?$")]
PostCode = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9 -]{0,16}$")]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=REASON_LENGTH_MAX, pattern=_PRINTABLE)]


class KycFields(msgspec.Struct, rename="camel", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The text fields of a form, as the quick start sends them (stored as JSON, shown to admins)."""

    first_name: Name
    last_name: Name
    birth_date: IsoDate
    country: Country  # ISO 3166-1 alpha-2 (upper-cased on input)
    document_type: DocumentType  # case-insensitive on input
    identity_card_no: DocumentNumber
    document_expiration_date: OptionalDate = ""
    nationality: Text = ""
    pesel: Pesel = ""
    street: Text = ""
    number: Short = ""
    apartment: Short = ""
    city: Text = ""
    post_code: PostCode = ""


class KycFormUpload(KycFields, kw_only=True):
    """The multipart body of `/register` (OpenAPI only): the text fields plus JPEG or PNG images."""

    image_front: bytes
    image_face: bytes | None = None
    image_back: bytes | None = None


class KycFormCreated(msgspec.Struct, rename="camel", frozen=True):
    form_id: int
    status: str


class KycStatus(msgspec.Struct, rename="camel", frozen=True):
    form_id: int
    status: str  # PENDING, ACCEPTED, REJECTED
    reason: str | None


class KycImageInfo(msgspec.Struct, rename="camel", frozen=True):
    name: str
    size: int
    content_type: str


class KycFormSummary(msgspec.Struct, rename="camel", frozen=True):
    form_id: int
    customer_id: int
    partner: str
    status: str
    created_at: str
    decided_at: str | None
    decided_by: str | None
    reason: str | None


class KycFormPage(msgspec.Struct, rename="camel", frozen=True):
    forms: list[KycFormSummary]
    next_after: int | None  # pass as `after` for the next page; null on the last one


class KycFormDetail(msgspec.Struct, rename="camel", frozen=True):
    form: KycFormSummary
    fields: KycFields
    images: list[KycImageInfo]


class KycReject(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    reason: Reason


_TEXT_FIELDS = frozenset(field.encode_name for field in msgspec.structs.fields(KycFields))
# Room for one stray field (e.g. an image sent as text) so the answer can name it, not just count.
FIELDS_MAX = len(_TEXT_FIELDS) + IMAGES_MAX
_images_decoder = msgspec.json.Decoder(list[KycImageInfo])
_fields_decoder = msgspec.json.Decoder(KycFields)
_reject_decoder = msgspec.json.Decoder(KycReject)


class SubmitStatus(enum.IntEnum):  # precedence order; never renumber
    ok = 0
    kyc_already_verified = 1
    form_pending = 2


class DecideStatus(enum.IntEnum):  # precedence order; never renumber
    ok = 0
    form_not_found = 1
    form_decided = 2


@attrs.frozen
class Image:
    name: str  # one of IMAGE_FIELDS
    content_type: str  # from the magic bytes, never from the client's header
    data: bytes


@attrs.frozen
class Submission:
    fields: KycFields
    images: tuple[Image, ...]


# -- validation (pure) ------------------------------------------------------------------------------


def image_content_type(data: bytes) -> str | None:
    """JPEG or PNG by their signatures; None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return None


def validate_submission(items: list[tuple[str, str | bytes]], *, today: datetime.date) -> Submission | str:
    """The parsed multipart items (text as str, files as bytes) -> a Submission, or what is wrong."""
    seen: set[str] = set()
    texts: dict[str, str] = {}
    images: list[Image] = []
    for name, value in items:
        if name in seen:
            return f"field `{name[:32]}` given twice"
        seen.add(name)
        if name in IMAGE_FIELDS:
            if not isinstance(value, bytes):
                return f"`{name}` must be a file"
            if not value:
                return f"`{name}` is empty"
            content_type = image_content_type(value)
            if content_type is None:
                return f"`{name}` is not a JPEG or PNG image"
            images.append(Image(name, content_type, value))
        elif name in _TEXT_FIELDS:
            if not isinstance(value, str):
                return f"`{name}` must be a text field, not a file"
            texts[name] = _normalize(name, value.strip())
        else:
            return f"unknown field `{name[:32]}`"
    if "imageFront" not in seen:
        return "`imageFront` is required"
    try:
        fields = msgspec.convert({k: v for k, v in texts.items() if v}, KycFields)
    except msgspec.ValidationError as error:
        return str(error)  # names the field and the rule (`... - at `$.birthDate``), not the value
    problem_text = _check_semantics(fields, today)
    if problem_text is not None:
        return problem_text
    assert len(images) <= IMAGES_MAX
    return Submission(fields, tuple(images))


def _normalize(name: str, value: str) -> str:
    if name == "documentType":
        return value.lower()
    if name == "country":
        return value.upper()
    return value


def _check_semantics(fields: KycFields, today: datetime.date) -> str | None:
    if fields.country not in COUNTRIES:
        return "`country` is not an ISO 3166-1 alpha-2 code"
    birth = _date(fields.birth_date)
    if birth is None or not (datetime.date(BIRTH_YEAR_MIN, 1, 1) <= birth < today):
        return "`birthDate` is not a past calendar date (YYYY-MM-DD)"
    if fields.document_expiration_date and _date(fields.document_expiration_date) is None:
        return "`documentExpirationDate` is not a calendar date (YYYY-MM-DD)"
    return None


def _date(text: str) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        return None


# -- multipart, in memory -----------------------------------------------------------------------------


class _InMemoryMultiPartParser(MultiPartParser):
    # Starlette spools file parts over 1 MiB to a temporary file: identity documents in the clear
    # on disk. The request body is bounded (KYC_BODY_BYTES_MAX), so keeping it in memory is bounded.
    spool_max_size = KYC_BODY_BYTES_MAX


async def read_items(request: Request) -> list[tuple[str, str | bytes]] | Response:
    """The multipart items with files read into bytes (each at most IMAGE_BYTES_MAX), or a problem."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":
        return problem(400, Title.INVALID_PAYLOAD, "expected a multipart/form-data body")
    parser = _InMemoryMultiPartParser(request.headers, request.stream(), max_files=IMAGES_MAX,
                                      max_fields=FIELDS_MAX, max_part_size=TEXT_PART_BYTES_MAX)
    try:
        form = await parser.parse()
    except MultiPartException as error:  # Starlette's messages name limits, not content
        return problem(400, Title.INVALID_PAYLOAD, f"malformed multipart body: {error.message}")
    try:
        items: list[tuple[str, str | bytes]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if value.size is None or value.size > IMAGE_BYTES_MAX:
                    detail = f"`{name[:32]}` is larger than {IMAGE_BYTES_MAX} bytes"
                    return problem(413, Title.PAYLOAD_TOO_LARGE, detail)
                items.append((name, await value.read()))
            else:
                items.append((name, value))
        return items
    finally:
        await form.close()


# -- the API ------------------------------------------------------------------------------------------


def reason_problem(reason: str) -> str | None:
    """What is wrong with a rejection reason (the REST body's rule), or None (the panel checks its
    form field with this)."""
    try:
        msgspec.convert({"reason": reason}, KycReject)
    except msgspec.ValidationError as error:
        return str(error)
    return None


def form_status(row: KycFormRow) -> KycStatus:
    return KycStatus(form_id=row.id, status=row.state, reason=row.reason or None)


def form_summary(row: KycFormRow) -> KycFormSummary:
    return KycFormSummary(
        form_id=row.id, customer_id=row.user_id, partner=row.partner, status=row.state,
        created_at=row.created_at, decided_at=row.decided_at or None, decided_by=row.decided_by or None,
        reason=row.reason or None,
    )  # fmt: skip


def kyc_event(kind: str, row: KycFormRow, reason: str = "") -> dict:
    """Event body: ids and the outcome only; the delivery worker looks up names for the notification."""
    return {"customerId": row.user_id, "formId": row.id, "status": NOTIFIED_STATUS[kind], "reason": reason or None}


def kyc_success_hooks(ctx: RestContext) -> list:
    """The hooks a KYC success runs on every channel (today: the programs' automatic balance);
    LifecycleApi (partner sets kyc SUCCESS) and KycApi (admin or panel accepts a form) get them."""
    return [auto_balance_hook(ctx)]


class KycApi:
    """`kyc_success_hooks` is LifecycleApi's own list (shared, not copied): `hook(user) -> list[AccountSpec]`
    runs inside the accepting transaction; the ledger accounts it returns are created after commit."""

    def __init__(self, ctx: RestContext, kyc_success_hooks: list) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.kyc_success_hooks = kyc_success_hooks
        self.files = KycFiles(ctx.data_dir) if ctx.data_dir is not None else None

    def routes(self) -> list[Route]:
        if self.files is None:  # a context without a data directory (unit tests) has nowhere for images
            return []
        both = Access(customer=True, partner=True)
        return [
            *customer_routes(self.ctx, "/register", self.submit, method="POST", access=both, name="kyc.submit",
                             doc=Doc("Submit a KYC verification form", body=KycFormUpload,
                                     response=KycFormCreated, status=201, problems=(404, 409), multipart=True)),
            *customer_routes(self.ctx, "/register", self.status, method="GET", access=both, name="kyc.status",
                             doc=Doc("Status of the latest KYC verification form", response=KycStatus)),
            admin_route("/admin/kyc-forms", self.list_forms, method="GET", roles=REVIEWERS, name="kyc.list",
                        doc=Doc("List KYC forms (paged by id)", response=KycFormPage, problems=())),
            admin_route("/admin/kyc-forms/{formId}", self.get_form, method="GET", roles=REVIEWERS,
                        name="kyc.get", doc=Doc("A KYC form: fields and image names", response=KycFormDetail)),
            admin_route("/admin/kyc-forms/{formId}/images/{name}", self.get_image, method="GET", roles=DECIDERS,
                        name="kyc.image", doc=Doc("A KYC form image (JPEG or PNG bytes)")),
            admin_route("/admin/kyc-forms/{formId}/accept", self.accept, method="POST", roles=DECIDERS,
                        name="kyc.accept", doc=Doc("Accept a KYC form", response=KycStatus, problems=(404, 409))),
            admin_route("/admin/kyc-forms/{formId}/reject", self.reject, method="POST", roles=DECIDERS,
                        name="kyc.reject", doc=Doc("Reject a KYC form", body=KycReject, response=KycStatus,
                                                   problems=(404, 409))),
        ]

    # -- customer and partner ----------------------------------------------------------------------

    async def submit(self, request: Request, call: Call) -> Response:
        items = await read_items(request)
        if isinstance(items, Response):
            return items
        submission = validate_submission(items, today=datetime.datetime.now(datetime.timezone.utc).date())
        if isinstance(submission, str):
            return invalid(submission)
        status = await self.ctx.in_thread(self._refusal, call.user.id)
        if status is not SubmitStatus.ok:
            return submit_refused(status)
        form_id = await self.ctx.in_thread(self.store.reserve_kyc_form_id)
        await self.ctx.in_thread(self.files.write_images, form_id,
                                 {image.name: image.data for image in submission.images})
        status = await self.ctx.in_thread(self._record, form_id, call.user, submission)
        if status is not SubmitStatus.ok:  # another submission won the race in between
            await self.ctx.in_thread(self.files.remove_form, form_id)
            return submit_refused(status)
        log.info("kyc form %d submitted for customer %d (%s)", form_id, call.user.id, call.caller.channel)
        return json_response(KycFormCreated(form_id=form_id, status=KYC_FORM_PENDING), status=201)

    def _refusal(self, user_id: int) -> SubmitStatus:
        user = self.store.get_user(user_id)
        assert user is not None, "users are never deleted"
        if user.kyc == KYC_SUCCESS:
            return SubmitStatus.kyc_already_verified
        latest = self.store.latest_kyc_form(user_id)
        if latest is not None and latest.state == KYC_FORM_PENDING:
            return SubmitStatus.form_pending
        return SubmitStatus.ok

    def _record(self, form_id: int, user: UserRow, submission: Submission) -> SubmitStatus:
        images = [KycImageInfo(name=image.name, size=len(image.data), content_type=image.content_type)
                  for image in submission.images]  # fmt: skip
        with self.store.transaction():
            status = self._refusal(user.id)  # again, under the write lock
            if status is not SubmitStatus.ok:
                return status
            row = self.store.insert_kyc_form(
                form_id, user_id=user.id, partner=user.partner,
                fields_json=msgspec.json.encode(submission.fields).decode(),
                images_json=msgspec.json.encode(images).decode(),
            )  # fmt: skip
            self.store.update_user(user.id, kyc=KYC_PENDING)
            self.store.append_event(user.partner, "kyc.submitted", f"customer:{user.id}",
                                    kyc_event("kyc.submitted", row))
        return SubmitStatus.ok

    async def status(self, request: Request, call: Call) -> Response:
        row = await self.ctx.in_thread(self.store.latest_kyc_form, call.user.id)
        if row is None:
            return problem(404, Title.KYC_FORM_NOT_FOUND, "no KYC form was submitted for this customer")
        assert row.user_id == call.user.id
        return json_response(form_status(row))

    # -- admin review ------------------------------------------------------------------------------

    async def list_forms(self, request: Request, caller: Caller) -> Response:
        query = request.query_params
        state = query.get("state") or None
        after_text = query.get("after", "0")
        after = 0 if after_text == "0" else parse_id(after_text)
        limit = parse_id(query.get("limit", str(PAGE_LIMIT_DEFAULT)))
        if state is not None and state not in FORM_STATES:
            return invalid(f"`state` must be one of {', '.join(FORM_STATES)}")
        if after is None or limit is None or limit > KYC_FORMS_PAGE_MAX:
            return invalid(f"`after` must be an id and `limit` 1..{KYC_FORMS_PAGE_MAX}")
        rows = await self.ctx.in_thread(self.store.kyc_forms, state=state, after_id=after, limit=limit)
        next_after = rows[-1].id if len(rows) == limit else None
        return json_response(KycFormPage(forms=[form_summary(row) for row in rows], next_after=next_after))

    async def get_form(self, request: Request, caller: Caller) -> Response:
        row = await self._form(request)
        if row is None:
            return form_not_found()
        detail = KycFormDetail(form=form_summary(row), fields=_fields_decoder.decode(row.fields_json),
                               images=_images_decoder.decode(row.images_json))
        return json_response(detail)

    async def get_image(self, request: Request, caller: Caller) -> Response:
        row = await self._form(request)
        if row is None:
            return form_not_found()
        try:
            image = await self.image(row, request.path_params["name"])
        except KycFileError:
            return problem(500, Title.INTERNAL_ERROR, "the image cannot be read")
        if image is None:
            return problem(404, Title.KYC_FORM_NOT_FOUND, f"form {row.id} has no image of that name")
        log.info("admin %s viewed image %s of kyc form %d", caller.admin, image.name, row.id)
        return image_response(image)

    async def image(self, row: KycFormRow, name: str) -> Image | None:
        """The form's image `name`, decrypted (None: the form has no such image). Raises
        KycFileError (logged) when the stored file cannot be read. The REST API and the panel
        both serve images through this, and only to DECIDERS."""
        found = [image for image in _images_decoder.decode(row.images_json) if image.name == name]
        if not found:
            return None
        (info,) = found
        try:
            data = await self.ctx.in_thread(self.files.read_image, row.id, info.name)
        except KycFileError:
            log.exception("kyc form %d: image %s unreadable", row.id, info.name)
            raise
        assert len(data) == info.size and image_content_type(data) == info.content_type
        return Image(info.name, info.content_type, data)

    async def accept(self, request: Request, caller: Caller) -> Response:
        return await self._decide(request, caller, accepted=True, reason="")

    async def reject(self, request: Request, caller: Caller) -> Response:
        try:
            body = _reject_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        return await self._decide(request, caller, accepted=False, reason=body.reason)

    async def _decide(self, request: Request, caller: Caller, *, accepted: bool, reason: str) -> Response:
        form_id = parse_id(request.path_params["formId"])
        if form_id is None:
            return form_not_found()
        before = await self.ctx.in_thread(self.store.get_kyc_form, form_id)
        if before is not None:
            set_before(request, form_status(before))
        status, row = await self.decide_form(form_id, accepted, caller.admin or "", reason)
        if status is DecideStatus.form_not_found:
            return form_not_found()
        if status is DecideStatus.form_decided:
            return problem(409, Title.KYC_FORM_DECIDED, f"form {form_id} was already decided")
        return json_response(form_status(row))

    async def decide_form(self, form_id: int, accepted: bool, admin: str,
                          reason: str) -> tuple[DecideStatus, KycFormRow | None]:
        """The whole decision, for every channel (REST `/admin/kyc-forms/.../accept|reject` and the
        panel): the store transaction (`decide`: form, user's kyc, partner event, success hooks),
        then the ledger accounts the hooks opened. Raises LedgerNotWritable before any change
        when an acceptance could not create its accounts."""
        if accepted:
            money.check_writable(self.ctx.ledger)  # before the store: its ledger accounts could not follow
        status, row, accounts = await self.ctx.in_thread(self.decide, form_id, accepted, admin, reason)
        if status is not DecideStatus.ok:
            return status, row
        if accounts and self.ctx.ledger is not None:
            await money.submit(self.ctx.ledger, accounts=accounts)
        log.info("admin %s %s kyc form %d", admin, "accepted" if accepted else "rejected", form_id)
        return status, row

    def decide(self, form_id: int, accepted: bool, admin: str,
               reason: str) -> tuple[DecideStatus, KycFormRow | None, list]:
        """Accept or reject a PENDING form, set the user's kyc and record the event, in one transaction."""
        kind, state = ("kyc.accepted", KYC_FORM_ACCEPTED) if accepted else ("kyc.rejected", KYC_FORM_REJECTED)
        with self.store.transaction():
            form = self.store.get_kyc_form(form_id)
            if form is None:
                return DecideStatus.form_not_found, None, []
            if not self.store.decide_kyc_form(form_id, state=state, decided_by=admin, reason=reason):
                return DecideStatus.form_decided, form, []
            before = self.store.get_user(form.user_id)
            assert before is not None and before.partner == form.partner
            accounts: list = []
            if accepted:
                user = self.store.update_user(form.user_id, kyc=KYC_SUCCESS)
                if before.kyc != KYC_SUCCESS:  # the hooks open balances: once per verification
                    accounts = [spec for hook in self.kyc_success_hooks for spec in hook(user)]
            elif before.kyc != KYC_SUCCESS:
                # A partner may have verified the user by its own KYC meanwhile (PUT kyc SUCCESS);
                # rejecting this form does not revoke that.
                self.store.update_user(form.user_id, kyc=KYC_REJECTED)
            decided = self.store.get_kyc_form(form_id)
            assert decided is not None and decided.state == state
            self.store.append_event(form.partner, kind, f"customer:{form.user_id}",
                                    kyc_event(kind, decided, reason))
        return DecideStatus.ok, decided, accounts

    async def _form(self, request: Request) -> KycFormRow | None:
        form_id = parse_id(request.path_params["formId"])
        if form_id is None:
            return None
        return await self.ctx.in_thread(self.store.get_kyc_form, form_id)


def image_response(image: Image) -> Response:
    """An image's bytes as served to admins: its own type (from the magic bytes), never cached."""
    return Response(image.data, media_type=image.content_type,
                    headers={"cache-control": "no-store", "x-content-type-options": "nosniff"})


def form_not_found() -> Response:
    return problem(404, Title.KYC_FORM_NOT_FOUND, "no such KYC form")


def submit_refused(status: SubmitStatus) -> Response:
    if status is SubmitStatus.kyc_already_verified:
        return problem(409, Title.KYC_ALREADY_VERIFIED, "the customer's KYC already succeeded")
    assert status is SubmitStatus.form_pending, status
    return problem(409, Title.KYC_FORM_PENDING, "a KYC form of this customer is awaiting review")
