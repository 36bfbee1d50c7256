"""KYC review: the queue of forms, each form with its document images, Accept and Reject.

    page / action                               roles (the REST admin channel's, authsrv/rest/kyc.py)
    GET  /panel/kyc[?state=&after=]             REVIEWERS (Admin, Manager, Employee)
    GET  /panel/kyc/{formId}                    REVIEWERS; images and buttons for DECIDERS only
    GET  /panel/kyc/{formId}/images/{name}      DECIDERS (Admin, Manager): the decrypted image, no-store
    POST /panel/kyc/{formId}/accept             DECIDERS
    POST /panel/kyc/{formId}/reject             DECIDERS, with a `reason` (the REST body's rule)

The queue lists forms waiting for review, oldest first (a filter shows decided ones). A decision
is `KycApi.decide_form`, exactly what `POST /admin/kyc-forms/{formId}/accept|reject` runs: the
form, the user's kyc flag and the partner event (`kyc.accepted` / `kyc.rejected`, the same
notification) in one store transaction, the KYC success hooks (the programs' automatic balance),
then the ledger accounts they opened. Images are read through `KycApi.image`, as the REST image
route does, and answered with `Cache-Control: no-store` (as every panel response).
"""

from __future__ import annotations

import logging
import urllib.parse

import msgspec
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from authsrv.panel.app import PanelApp
from authsrv.panel.security import Operator
from authsrv.rest.context import parse_id
from authsrv.rest.kyc import (
    DECIDERS,
    FORM_STATES,
    REVIEWERS,
    DecideStatus,
    KycApi,
    KycFields,
    KycImageInfo,
    image_response,
    kyc_success_hooks,
    reason_problem,
)
from authsrv.rest.money import LedgerNotWritable
from authsrv.store.db import KYC_FORM_PENDING, KYC_FORMS_PAGE_MAX, KycFormRow
from authsrv.store.kycfiles import KycFileError

log = logging.getLogger("authsrv.panel")

QUEUE_PAGE = 25
assert QUEUE_PAGE <= KYC_FORMS_PAGE_MAX
ALL_STATES = "ALL"
FIELD_LABELS = {
    "first_name": "First name", "last_name": "Last name", "birth_date": "Birth date", "country": "Country",
    "document_type": "Document type", "identity_card_no": "Document number",
    "document_expiration_date": "Document expires", "nationality": "Nationality", "pesel": "PESEL",
    "street": "Street", "number": "Number", "apartment": "Apartment", "city": "City", "post_code": "Post code",
}  # fmt: skip
IMAGE_LABELS = {"imageFace": "Face", "imageFront": "Document front", "imageBack": "Document back"}
_fields_decoder = msgspec.json.Decoder(KycFields)
_images_decoder = msgspec.json.Decoder(list[KycImageInfo])


def fields_of(row: KycFormRow) -> KycFields:
    return _fields_decoder.decode(row.fields_json)


def images_of(row: KycFormRow) -> list[KycImageInfo]:
    return _images_decoder.decode(row.images_json)


def form_state(form: KycFormRow | None, user) -> dict | None:
    """The audit's before/after values of a decision."""
    if form is None:
        return None
    return {"form": form.state, "reason": form.reason or None, "userKyc": user.kyc if user is not None else None}


def register(panel: PanelApp) -> None:
    ctx = panel.ctx
    store = panel.store
    api = KycApi(ctx, kyc_success_hooks(ctx))  # the REST API's decision code and success hooks

    def queue_rows(state: str | None, after: int) -> list[dict]:
        rows = store.kyc_forms(state=state, after_id=after, limit=QUEUE_PAGE)
        listed = []
        for row in rows:
            fields = fields_of(row)
            listed.append({"form": row, "name": f"{fields.first_name} {fields.last_name}",
                           "images": [image.name for image in images_of(row)]})
        return listed

    @panel.page("/kyc", roles=REVIEWERS)
    async def queue(request: Request, op: Operator) -> Response:
        query = request.query_params
        state = query.get("state") or KYC_FORM_PENDING
        after_text = query.get("after") or "0"
        after = 0 if after_text == "0" else parse_id(after_text)
        if (state not in FORM_STATES and state != ALL_STATES) or after is None:
            return panel.error(request, op, 400, "Bad filter",
                               f"The state is one of {', '.join((*FORM_STATES, ALL_STATES))}; `after` is a form id.")
        rows = await ctx.in_thread(queue_rows, None if state == ALL_STATES else state, after)
        next_url = ""
        if len(rows) == QUEUE_PAGE:
            next_url = "/panel/kyc?" + urllib.parse.urlencode({"state": state, "after": rows[-1]["form"].id})
        return panel.render(request, op, "kyc_queue.html", rows=rows, state=state,
                            states=(*FORM_STATES, ALL_STATES), next_url=next_url, first_page=after == 0,
                            show_images=op.role in DECIDERS and api.files is not None,
                            image_labels=IMAGE_LABELS)

    async def render_form(request: Request, op: Operator, row: KycFormRow, *, status: int = 200,
                          error: str = "", reason: str = "") -> Response:
        user = await ctx.in_thread(store.get_user, row.user_id)
        fields = msgspec.structs.asdict(fields_of(row))
        facts = [(FIELD_LABELS[name], value) for name, value in fields.items() if value]
        can_decide = op.role in DECIDERS and row.state == KYC_FORM_PENDING
        return panel.render(request, op, "kyc_form.html", status=status, form=row, user=user, facts=facts,
                            images=images_of(row), image_labels=IMAGE_LABELS,
                            show_images=op.role in DECIDERS and api.files is not None,
                            can_decide=can_decide, pending=row.state == KYC_FORM_PENDING,
                            error=error, reason=reason)

    async def find(request: Request) -> KycFormRow | None:
        form_id = parse_id(request.path_params["formId"])
        if form_id is None:
            return None
        return await ctx.in_thread(store.get_kyc_form, form_id)

    @panel.page("/kyc/{formId}", roles=REVIEWERS)
    async def form_page(request: Request, op: Operator) -> Response:
        row = await find(request)
        if row is None:
            return panel.not_found(request, op, "KYC form")
        return await render_form(request, op, row)

    @panel.page("/kyc/{formId}/images/{name}", roles=DECIDERS)
    async def image(request: Request, op: Operator) -> Response:
        row = await find(request)
        if row is None or api.files is None:
            return panel.not_found(request, op, "KYC form")
        try:
            found = await api.image(row, request.path_params["name"])
        except KycFileError:
            return panel.error(request, op, 500, "Image unreadable", "The stored image cannot be read.")
        if found is None:
            return panel.not_found(request, op, "image")
        log.info("panel %s viewed image %s of kyc form %d", op.username, found.name, row.id)
        return image_response(found)

    async def decide(request: Request, op: Operator, *, accepted: bool, reason: str) -> Response:
        row = await find(request)
        if row is None:
            return panel.not_found(request, op, "KYC form")
        action = "kyc.accept" if accepted else "kyc.reject"
        target = f"kyc_form:{row.id}"
        if not accepted:
            if not reason:
                return await render_form(request, op, row, status=400,
                                         error="Type a reason first: it is required, and sent to the partner.")
            if reason_problem(reason) is not None:
                return await render_form(request, op, row, status=400, reason=reason,
                                         error="The reason is at most 256 characters, without control characters.")
        before_user = await ctx.in_thread(store.get_user, row.user_id)
        try:
            status, decided = await api.decide_form(row.id, accepted, op.username, reason)
        except LedgerNotWritable as error:
            await panel.audit(op, action, target, "refused: ledger not writable", before=form_state(row, before_user))
            return await render_form(request, op, row, status=503, error=str(error), reason=reason)
        if status is DecideStatus.form_not_found:
            return panel.not_found(request, op, "KYC form")
        if status is DecideStatus.form_decided:
            fresh = await ctx.in_thread(store.get_kyc_form, row.id) or row
            await panel.audit(op, action, target, "refused: already decided", before=form_state(fresh, before_user))
            return await render_form(request, op, fresh, status=409,
                                     error=f"Form {row.id} was already decided ({fresh.state.lower()}); "
                                     "nothing was changed.")
        assert decided is not None
        after_user = await ctx.in_thread(store.get_user, row.user_id)
        await panel.audit(op, action, target, "ok", before=form_state(row, before_user),
                          after=form_state(decided, after_user), detail=f"customer {row.user_id}")
        verdict = "accepted" if accepted else "rejected"
        return panel.redirect(request, f"/panel/kyc/{row.id}",
                              flash=f"Form {row.id} {verdict}: customer {row.user_id}'s KYC is now "
                              f"{after_user.kyc if after_user is not None else '?'}.")

    @panel.action("/kyc/{formId}/accept", roles=DECIDERS)
    async def accept(request: Request, op: Operator, form: FormData) -> Response:
        return await decide(request, op, accepted=True, reason="")

    @panel.action("/kyc/{formId}/reject", roles=DECIDERS)
    async def reject(request: Request, op: Operator, form: FormData) -> Response:
        reason = form.get("reason")
        return await decide(request, op, accepted=False, reason=reason.strip() if isinstance(reason, str) else "")
