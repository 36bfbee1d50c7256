"""KYC forms over real HTTPS: partner and customer submission, admin review, encrypted images, bad input."""

from __future__ import annotations

import datetime
import io
import json
import os
import stat
from pathlib import Path

import httpx
import pytest
import trio
from PIL import Image as PilImage

import authsrv.app
from authsrv.pki import client_ssl_context
from authsrv.rest.auth import AdminSubject, CustomerSubject
from authsrv.rest.context import RestContext
from starlette.responses import Response

from authsrv.rest.errors import KYC_BODY_BYTES_MAX, REQUEST_BODY_BYTES_MAX, ProblemMiddleware
from authsrv.rest.kyc import IMAGE_BYTES_MAX, DecideStatus, KycApi, validate_submission
from authsrv.store.db import Role, Store
from authsrv.store.kycfiles import KycFileError, KycFiles
from authsrv.store.partners import add_partner
from tests.conftest import start_in_process

PROBLEM = "application/problem+json"
USER = {"firstName": "Leon", "lastName": "Bakiewicz", "phone": "48500600700", "email": "leon@example.com",
        "birthDate": "1970-01-01", "wPIN": "5058", "state": "VERIFIED", "kyc": "PENDING"}  # fmt: skip
# The quick start's form (reference documents, 003 step 2), text fields exactly as sent there.
FORM = {"firstName": "Leon", "lastName": "Bakiewicz", "street": "Pieklo", "pesel": "70010155587", "number": "17a",
        "city": "Lublin", "birthDate": "1970-01-01", "postCode": "20-128", "identityCardNo": "ASD123456",
        "apartment": "2", "documentType": "passport", "country": "PL", "documentExpirationDate": "2025-01-30",
        "nationality": "polish"}  # fmt: skip
pytestmark = pytest.mark.timeout(60)


def _image(fmt: str, color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    PilImage.new("RGB", (16, 12), color).save(out, format=fmt)
    return out.getvalue()


JPEG = _image("JPEG", (200, 30, 30))
PNG = _image("PNG", (30, 200, 30))
JPEG_BACK = _image("JPEG", (30, 30, 200))
IMAGES = {"imageFace": ("face.png", PNG, "image/png"), "imageFront": ("front.jpg", JPEG, "image/jpeg"),
          "imageBack": ("back.jpg", JPEG_BACK, "image/jpeg")}  # fmt: skip


def client(data_dir: Path, port: int, stem: str | None, token: str | None = None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=client_ssl_context(data_dir / "pki", stem),
                             timeout=20, headers=headers)


def assert_problem(reply: httpx.Response, status: int, title: str) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    body = reply.json()
    assert body["title"] == title and body["status"] == status and body["detail"]
    return body


class Rest:
    def __init__(self, handle, ctx: RestContext, data_dir: Path, demo, other) -> None:
        self.handle, self.ctx, self.data_dir, self.demo, self.other = handle, ctx, data_dir, demo, other

    def admin(self, role: Role) -> httpx.AsyncClient:
        token = self.ctx.admin_sessions.issue(AdminSubject(f"test-{role.value.lower()}", role))
        return client(self.data_dir, self.handle.rest_port, None, token)

    def customer(self, customer_id: int) -> httpx.AsyncClient:
        token = self.ctx.customer_sessions.issue(CustomerSubject(customer_id, "demo", "device-1"))
        return client(self.data_dir, self.handle.rest_port, None, token)

    async def new_user(self, phone: str = "48500600700") -> int:
        reply = await self.demo.post("/lifecycle/v1/wallet", json={**USER, "phone": phone})
        assert reply.status_code == 201, reply.text
        return reply.json()["customerId"]

    def events(self, kind_prefix: str = "kyc.") -> list:
        return [event for event in self.handle.store.events(partner="demo", limit=1000)
                if event.kind.startswith(kind_prefix)]  # fmt: skip


@pytest.fixture
async def rest(data_dir: Path, monkeypatch):
    # The server builds its RestContext inside run_server; keep a reference to issue session tokens
    # directly (the sessions endpoints are another module's, tested there).
    contexts: list[RestContext] = []
    make_context = authsrv.app.make_context

    def capturing(*args, **kwargs):
        contexts.append(make_context(*args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(authsrv.app, "make_context", capturing)
    add_partner(data_dir, "other")
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir)
        async with client(data_dir, handle.rest_port, "partner") as demo, \
                client(data_dir, handle.rest_port, "other") as other:  # fmt: skip
            yield Rest(handle, contexts[0], data_dir, demo, other)
        handle.stop.set()


async def submit(http: httpx.AsyncClient, path: str, form: dict = FORM, images: dict = IMAGES) -> httpx.Response:
    return await http.post(path, data=form, files=images)


async def test_partner_submits_admin_reviews_and_accepts(rest: Rest) -> None:
    customer_id = await rest.new_user()
    path = f"/secure/customers/{customer_id}/register"
    assert_problem(await rest.demo.get(path), 404, "KYC_FORM_NOT_FOUND")
    reply = await submit(rest.demo, path)
    assert reply.status_code == 201, reply.text
    form_id = reply.json()["formId"]
    assert reply.json() == {"formId": form_id, "status": "PENDING"}
    assert (await rest.demo.get(path)).json() == {"formId": form_id, "status": "PENDING", "reason": None}
    assert_problem(await submit(rest.demo, path), 409, "KYC_FORM_PENDING")

    # At rest: encrypted, owner-only files; no image signature nor text in the clear.
    form_dir = rest.data_dir / "kyc" / str(form_id)
    assert sorted(p.name for p in form_dir.iterdir()) == ["imageBack.bin", "imageFace.bin", "imageFront.bin"]
    for file in form_dir.iterdir():
        data = file.read_bytes()
        assert b"\xff\xd8\xff" not in data and b"PNG" not in data[4:] and b"JFIF" not in data
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE((rest.data_dir / "keys" / "kyc.key").stat().st_mode) == 0o600

    async with rest.admin(Role.employee) as employee, rest.admin(Role.manager) as manager, \
            rest.admin(Role.admin) as admin:  # fmt: skip
        listed = (await employee.get("/admin/kyc-forms", params={"state": "PENDING"})).json()
        assert form_id in [form["formId"] for form in listed["forms"]]
        detail = (await employee.get(f"/admin/kyc-forms/{form_id}")).json()
        assert detail["form"]["customerId"] == customer_id and detail["form"]["status"] == "PENDING"
        assert detail["fields"] == FORM
        assert {image["name"]: (image["size"], image["contentType"]) for image in detail["images"]} == {
            "imageFace": (len(PNG), "image/png"), "imageFront": (len(JPEG), "image/jpeg"),
            "imageBack": (len(JPEG_BACK), "image/jpeg")}  # fmt: skip
        assert_problem(await employee.get(f"/admin/kyc-forms/{form_id}/images/imageFront"), 403, "FORBIDDEN")
        assert_problem(await employee.post(f"/admin/kyc-forms/{form_id}/accept"), 403, "FORBIDDEN")
        image = await manager.get(f"/admin/kyc-forms/{form_id}/images/imageFront")
        assert image.status_code == 200 and image.content == JPEG
        assert image.headers["content-type"] == "image/jpeg" and image.headers["cache-control"] == "no-store"
        face = await manager.get(f"/admin/kyc-forms/{form_id}/images/imageFace")
        assert face.content == PNG and face.headers["content-type"] == "image/png"

        reply = await admin.post(f"/admin/kyc-forms/{form_id}/accept")
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"formId": form_id, "status": "ACCEPTED", "reason": None}
        assert_problem(await manager.post(f"/admin/kyc-forms/{form_id}/accept"), 409, "KYC_FORM_DECIDED")
        assert_problem(await manager.post(f"/admin/kyc-forms/{form_id}/reject", json={"reason": "late"}), 409,
                       "KYC_FORM_DECIDED")  # fmt: skip
        decided = (await employee.get(f"/admin/kyc-forms/{form_id}")).json()["form"]
        assert decided["decidedBy"] == "test-admin" and decided["decidedAt"]

    assert (await rest.demo.get(f"/lifecycle/v1/wallet/{customer_id}")).json()["kyc"] == "SUCCESS"
    assert (await rest.demo.get(path)).json()["status"] == "ACCEPTED"
    assert_problem(await submit(rest.demo, path), 409, "KYC_ALREADY_VERIFIED")
    events = [event for event in rest.events() if event.subject == f"customer:{customer_id}"]
    assert [event.kind for event in events] == ["kyc.submitted", "kyc.accepted"]
    for event in events:
        body = json.loads(event.body)
        assert body["customerId"] == customer_id and body["formId"] == form_id
        assert "Leon" not in event.body and "ASD123456" not in event.body and "70010155587" not in event.body
    assert [json.loads(event.body)["status"] for event in events] == ["IN_PROGRESS", "ACCEPTED"]


async def test_reject_then_resubmit(rest: Rest) -> None:
    customer_id = await rest.new_user()
    path = f"/secure/customers/{customer_id}/register"
    first = (await submit(rest.demo, path, images={"imageFront": IMAGES["imageFront"]})).json()["formId"]
    async with rest.admin(Role.manager) as manager:
        assert_problem(await manager.post(f"/admin/kyc-forms/{first}/reject", json={}), 400, "INVALID_PAYLOAD")
        assert_problem(await manager.post(f"/admin/kyc-forms/{first}/reject", content=b"{"), 400, "INVALID_PAYLOAD")
        reply = await manager.post(f"/admin/kyc-forms/{first}/reject", json={"reason": "INVALID_CUSTOMER_DATA"})
        assert reply.json() == {"formId": first, "status": "REJECTED", "reason": "INVALID_CUSTOMER_DATA"}
        assert_problem(await manager.post(f"/admin/kyc-forms/{first}/accept"), 409, "KYC_FORM_DECIDED")
        rejected = (await manager.get("/admin/kyc-forms", params={"state": "REJECTED"})).json()["forms"]
        assert [form["formId"] for form in rejected] == [first]
        assert_problem(await manager.get(f"/admin/kyc-forms/{first}/images/imageBack"), 404, "KYC_FORM_NOT_FOUND")
    assert (await rest.demo.get(f"/lifecycle/v1/wallet/{customer_id}")).json()["kyc"] == "REJECTED"
    assert (await rest.demo.get(path)).json() == {"formId": first, "status": "REJECTED",
                                                  "reason": "INVALID_CUSTOMER_DATA"}  # fmt: skip
    rejected_event = rest.events("kyc.rejected")[-1]
    assert json.loads(rejected_event.body)["reason"] == "INVALID_CUSTOMER_DATA"

    second = await submit(rest.demo, path)
    assert second.status_code == 201 and second.json()["formId"] > first
    assert (await rest.demo.get(f"/lifecycle/v1/wallet/{customer_id}")).json()["kyc"] == "PENDING"


async def test_customer_submits_own_form(rest: Rest) -> None:
    customer_id = await rest.new_user()
    async with rest.customer(customer_id) as mobile:
        reply = await submit(mobile, "/customers/me/register", form={**FORM, "documentType": "ID_CARD"})
        assert reply.status_code == 201, reply.text
        status = (await mobile.get("/customers/me/register")).json()
        assert status == {"formId": reply.json()["formId"], "status": "PENDING", "reason": None}
    async with rest.admin(Role.admin) as admin:
        detail = (await admin.get(f"/admin/kyc-forms/{status['formId']}")).json()
        assert detail["fields"]["documentType"] == "id_card" and detail["form"]["customerId"] == customer_id


async def test_other_partner_sees_nothing(rest: Rest) -> None:
    customer_id = await rest.new_user()
    path = f"/secure/customers/{customer_id}/register"
    assert (await submit(rest.demo, path)).status_code == 201
    assert_problem(await submit(rest.other, path), 404, "CUSTOMER_NOT_FOUND")
    assert_problem(await rest.other.get(path), 404, "CUSTOMER_NOT_FOUND")
    assert_problem(await rest.other.get("/secure/customers/abc/register"), 404, "CUSTOMER_NOT_FOUND")


BAD_FORMS = [
    ("missing lastName", {k: v for k, v in FORM.items() if k != "lastName"}, IMAGES, "lastName"),
    ("missing imageFront", FORM, {"imageFace": IMAGES["imageFace"]}, "imageFront"),
    ("unknown field", {**FORM, "cvv": "123"}, IMAGES, "cvv"),
    ("bad country", {**FORM, "country": "XX"}, IMAGES, "country"),
    ("bad document type", {**FORM, "documentType": "visa"}, IMAGES, "documentType"),
    ("impossible date", {**FORM, "birthDate": "1970-02-30"}, IMAGES, "birthDate"),
    ("future birth", {**FORM, "birthDate": "2999-01-01"}, IMAGES, "birthDate"),
    ("bad expiry", {**FORM, "documentExpirationDate": "30.01.2025"}, IMAGES, "documentExpirationDate"),
    ("long name", {**FORM, "firstName": "L" * 65}, IMAGES, "firstName"),
    ("control char", {**FORM, "city": "Lub\x1blin"}, IMAGES, "city"),
    ("not an image", FORM, {"imageFront": ("front.jpg", b"%PDF-1.7 not a picture", "image/jpeg")}, "imageFront"),
    ("empty image", FORM, {"imageFront": ("front.jpg", b"", "image/jpeg")}, "imageFront"),
    ("image as text", {**FORM, "imageFront": "abc"}, {"imageFace": IMAGES["imageFace"]}, "imageFront"),
    ("file as text field", FORM, {"imageFront": IMAGES["imageFront"], "city": ("c.txt", b"Lublin", "text/plain")},
     "city"),
    ("image twice", FORM, [("imageFront", IMAGES["imageFront"]), ("imageFront", IMAGES["imageBack"])], "imageFront"),
    ("four files", FORM, [*IMAGES.items(), ("imageExtra", IMAGES["imageBack"])], "files"),
]  # fmt: skip


async def test_bad_form_is_400_naming_the_field(rest: Rest) -> None:
    # One server for every case (a server start costs more than all the requests).
    customer_id = await rest.new_user()
    path = f"/secure/customers/{customer_id}/register"
    for case, form, images, named in BAD_FORMS:
        problem = assert_problem(await submit(rest.demo, path, form=form, images=images), 400, "INVALID_PAYLOAD")
        assert named in problem["detail"], (case, problem)
        for secret in ("70010155587", "ASD123456", "Bakiewicz"):
            assert secret not in problem["detail"], case
    assert_problem(await rest.demo.get(path), 404, "KYC_FORM_NOT_FOUND")  # nothing was recorded
    assert not (rest.data_dir / "kyc").exists() or not any((rest.data_dir / "kyc").iterdir())
    assert (await rest.demo.get(f"/lifecycle/v1/wallet/{customer_id}")).json()["kyc"] == "PENDING"
    assert not rest.events()


GARBAGE = [
    (b'{"firstName": "Leon"}', "application/json"),
    (b"firstName=Leon", "application/x-www-form-urlencoded"),
    (b"garbage", "multipart/form-data"),  # no boundary
    (b"\x00\xff garbage without any boundary line \r\n\r\n", "multipart/form-data; boundary=xyz"),
    (b"--xyz\r\nContent-Disposition: form-data\r\n\r\nLeon\r\n--xyz--\r\n", "multipart/form-data; boundary=xyz"),
    (b"--xyz\r\nContent-Disposition: form-data; name=\"firstName\"\r\n\r\n" + b"L" * 4096 + b"\r\n--xyz--\r\n",
     "multipart/form-data; boundary=xyz"),
    (b"", "multipart/form-data; boundary=xyz"),
]  # fmt: skip


async def test_garbage_body_is_400(rest: Rest) -> None:
    customer_id = await rest.new_user()
    for body, content_type in GARBAGE:
        reply = await rest.demo.post(f"/secure/customers/{customer_id}/register", content=body,
                                     headers={"content-type": content_type})
        assert_problem(reply, 400, "INVALID_PAYLOAD")
    assert_problem(await rest.demo.get(f"/secure/customers/{customer_id}/register"), 404, "KYC_FORM_NOT_FOUND")


async def test_oversized_image_and_body(rest: Rest) -> None:
    customer_id = await rest.new_user()
    path = f"/secure/customers/{customer_id}/register"
    big = JPEG[:4] + bytes(IMAGE_BYTES_MAX + 1 - 4)
    problem = assert_problem(await submit(rest.demo, path, images={"imageFront": ("f.jpg", big, "image/jpeg")}),
                             413, "PAYLOAD_TOO_LARGE")  # fmt: skip
    assert "imageFront" in problem["detail"]
    at_limit = JPEG[:4] + bytes(IMAGE_BYTES_MAX - 4)  # exactly 4 MiB is allowed
    reply = await submit(rest.demo, path, images={"imageFront": ("f.jpg", at_limit, "image/jpeg")})
    assert reply.status_code == 201, reply.text
    # Everywhere else the default bound (64 KiB) still holds.
    reply = await rest.demo.post("/lifecycle/v1/wallet", content=bytes(100 * 1024),
                                 headers={"content-type": "application/json"})
    assert_problem(reply, 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("path,length,status", [
    ("/secure/customers/1/register", KYC_BODY_BYTES_MAX + 1, 413),
    ("/secure/customers/1/register", REQUEST_BODY_BYTES_MAX + 1, 200),
    ("/customers/me/register", KYC_BODY_BYTES_MAX, 200),
    ("/lifecycle/v1/wallet", REQUEST_BODY_BYTES_MAX + 1, 413),
    ("/customers/me/register/x", REQUEST_BODY_BYTES_MAX + 1, 413),
])  # fmt: skip
async def test_body_bound_per_path(path: str, length: int, status: int) -> None:
    # At the ASGI level: over TLS a client still sending a body the server refuses unread may see a
    # reset instead of the 413 (the server does not read past the bound, by design).
    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await Response(b"ok")(scope, receive, send)

    chunks = [bytes(min(65536, length - offset)) for offset in range(0, length, 65536)]
    messages: list[dict] = []
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message) -> None:
        sent.append(message)

    for declared in (True, False):  # by Content-Length, and while reading a chunked body
        messages[:] = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                       for i, chunk in enumerate(chunks)]  # fmt: skip
        sent.clear()
        headers = [(b"content-length", str(length).encode())] if declared else []
        await ProblemMiddleware(app)({"type": "http", "path": path, "method": "POST", "headers": headers},
                                     receive, send)  # fmt: skip
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == status, (declared, sent[0])


async def test_admin_lookups_refuse_bad_ids_and_queries(rest: Rest) -> None:
    async with rest.admin(Role.admin) as admin:
        for path in ("/admin/kyc-forms/abc", "/admin/kyc-forms/999999", "/admin/kyc-forms/0/images/imageFront",
                     "/admin/kyc-forms/999999/images/imageFront"):
            assert_problem(await admin.get(path), 404, "KYC_FORM_NOT_FOUND")
        assert_problem(await admin.post("/admin/kyc-forms/999999/accept"), 404, "KYC_FORM_NOT_FOUND")
        for params in ({"state": "OPEN"}, {"limit": "0"}, {"limit": "100000"}, {"after": "-1"}):
            assert_problem(await admin.get("/admin/kyc-forms", params=params), 400, "INVALID_PAYLOAD")
        customer_id = await rest.new_user()
        form_ids = []
        for phone in ("48500600710", "48500600711", "48500600712"):
            user = await rest.new_user(phone=phone)
            reply = await submit(rest.demo, f"/secure/customers/{user}/register",
                                 images={"imageFront": IMAGES["imageFront"]})
            form_ids.append(reply.json()["formId"])
        page = (await admin.get("/admin/kyc-forms", params={"limit": "2"})).json()
        assert [form["formId"] for form in page["forms"]] == form_ids[:2] and page["nextAfter"] == form_ids[1]
        page = (await admin.get("/admin/kyc-forms", params={"limit": "2", "after": page["nextAfter"]})).json()
        assert [form["formId"] for form in page["forms"]] == form_ids[2:] and page["nextAfter"] is None
        for name in ("imageFront.bin", "kyc.key", "imageExtra", "%2E%2E"):
            reply = await admin.get(f"/admin/kyc-forms/{form_ids[0]}/images/{name}")
            assert_problem(reply, 404, "KYC_FORM_NOT_FOUND")
        assert (await admin.get(f"/admin/kyc-forms/{form_ids[0]}/images/..%2F..%2Fkeys%2Fkyc.key")).status_code == 404
    async with client(rest.data_dir, rest.handle.rest_port, None) as anonymous:
        assert_problem(await anonymous.get("/admin/kyc-forms"), 401, "UNAUTHORIZED")
        assert_problem(await anonymous.post(f"/secure/customers/{customer_id}/register"), 401, "UNAUTHORIZED")


async def test_openapi_documents_kyc_routes(rest: Rest) -> None:
    document = (await rest.demo.get("/openapi.json")).json()
    post = document["paths"]["/secure/customers/{customerId}/register"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"] and "201" in post["responses"]
    assert document["paths"]["/admin/kyc-forms/{formId}/accept"]["post"]["x-admin-roles"] == ["Admin", "Manager"]


# -- without HTTP ---------------------------------------------------------------------------------------


def test_image_files_are_bound_to_form_and_field(tmp_path: Path) -> None:
    files = KycFiles(tmp_path)
    files.write_images(7, {"imageFront": JPEG, "imageFace": PNG})
    assert files.read_image(7, "imageFront") == JPEG and files.read_image(7, "imageFace") == PNG
    key = (tmp_path / "keys" / "kyc.key").read_bytes()
    assert len(key) == 32 and KycFiles(tmp_path).read_image(7, "imageFace") == PNG  # same key reloaded
    # A file moved to another field or form does not authenticate.
    os.replace(files.image_path(7, "imageFace"), files.image_path(7, "imageBack"))
    with pytest.raises(KycFileError):
        files.read_image(7, "imageBack")
    tampered = bytearray(files.image_path(7, "imageFront").read_bytes())
    tampered[-1] ^= 1
    files.image_path(7, "imageFront").write_bytes(bytes(tampered))
    with pytest.raises(KycFileError):
        files.read_image(7, "imageFront")
    with pytest.raises(KycFileError):
        files.read_image(8, "imageFront")
    assert files.orphan_form_ids(known=set()) == [7] and files.orphan_form_ids(known={7}) == []
    with pytest.raises(FileExistsError):
        files.write_images(7, {"imageFront": JPEG})  # a form id is written once


def test_validation_normalizes_case_and_ignores_empty_optionals() -> None:
    items = [*{**FORM, "country": "pl", "documentType": "Driving_License", "pesel": ""}.items(), ("imageFront", JPEG)]
    submission = validate_submission(items, today=datetime.date(2024, 1, 1))
    assert not isinstance(submission, str), submission
    assert submission.fields.country == "PL" and submission.fields.document_type == "driving_license"
    assert submission.fields.pesel == "" and [image.content_type for image in submission.images] == ["image/jpeg"]
    assert "birthDate" in validate_submission(items, today=datetime.date(1969, 1, 1))


def test_accept_runs_success_hooks_once(data_dir: Path) -> None:
    store = Store.open(data_dir)
    try:
        calls = []
        api = KycApi(RestContext(store=store, data_dir=data_dir), [lambda user: calls.append(user.id) or ["spec"]])
        user = store.create_user(partner="demo", first_name="A", last_name="B", phone="1234567", email="a@b.c",
                                 birth_date="1990-01-01", state="VERIFIED", kyc="PENDING")  # fmt: skip
        form_id = store.reserve_kyc_form_id()
        store.insert_kyc_form(form_id, user_id=user.id, partner="demo", fields_json="{}", images_json="[]")
        status, row, accounts = api.decide(form_id, True, "boss", "")
        assert status is DecideStatus.ok and row.state == "ACCEPTED" and accounts == ["spec"] and calls == [user.id]
        assert api.decide(form_id, True, "boss", "")[0] is DecideStatus.form_decided and calls == [user.id]
        assert api.decide(form_id + 1000, False, "boss", "x")[0] is DecideStatus.form_not_found
        assert store.get_user(user.id).kyc == "SUCCESS"
        assert store.reserve_kyc_form_id() == form_id + 1
    finally:
        store.close()
