"""Schemathesis against the live /openapi.json: generated requests on every operation, every
channel's credentials, and no answer is a 5xx; every error is problem+json.

The server is a real `authsrv serve` subprocess (schemathesis drives it with `requests`, synchronously).
The default run sends a few examples per operation; `make slow` (`-m slow`) sends many more.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from authsrv.pki import client_ssl_context
from tests.conftest import ServerProcess

PROBLEM = "application/problem+json"
OPEN_PATHS = ("/customers/sessions", "/admin/sessions", "/customers/public_key", "/openapi.json")


class Api:
    def __init__(self, data_dir: Path, process: ServerProcess) -> None:
        self.data_dir = data_dir
        self.process = process
        self.base_url = f"https://127.0.0.1:{process.rest_port}"
        pki = data_dir / "pki"
        self.session = requests.Session()
        self.session.verify = str(pki / "ca.crt")
        self.session.cert = (str(pki / "partner.crt"), str(pki / "partner.key"))
        # httpx 0.28 sends a client certificate only from an SSLContext
        http = httpx.Client(base_url=self.base_url, verify=client_ssl_context(pki, "partner"), timeout=20)
        with http:
            self.schema_doc = http.get("/openapi.json").json()
            user = {"firstName": "Fuzz", "lastName": "Target", "phone": "48500600700", "email": "fuzz@example.com",
                    "birthDate": "1980-01-01", "wPIN": "1357", "kyc": "SUCCESS"}  # fmt: skip
            created = http.post("/lifecycle/v1/wallet", json=user)
            assert created.status_code == 201, created.text
            self.customer_id = created.json()["customerId"]
            login = http.post("/customers/sessions", json={"phone": user["phone"], "wPIN": "1357", "deviceId": "fz"})
            assert login.status_code in (200, 201), login.text
            self.customer_token = login.json()["token"]
            password = (data_dir / "admin-password").read_text().strip()
            admin = http.post("/admin/sessions", json={"username": "admin", "password": password})
            assert admin.status_code in (200, 201), admin.text
            self.admin_token = admin.json()["token"]

    def headers_for(self, path: str) -> dict[str, str]:
        if path.startswith("/customers/me"):
            return {"Authorization": f"Bearer {self.customer_token}"}
        if path.startswith("/admin/") and path not in OPEN_PATHS:
            return {"Authorization": f"Bearer {self.admin_token}"}
        return {}


@pytest.fixture(scope="module")
def api(template_dir: Path, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    shutil.copytree(template_dir, data_dir)
    process = ServerProcess(data_dir).start()
    try:
        yield Api(data_dir, process)
        assert process.proc.poll() is None, "the server died under fuzzing"
        assert "Traceback" not in process.read_log() or "unexpected error" not in process.read_log()
    finally:
        process.terminate()


def _check(api: Api, case) -> None:
    if "customerId" in (case.path_parameters or {}):
        case.path_parameters["customerId"] = api.customer_id  # reach past the ownership check
    response = case.call(base_url=api.base_url, session=api.session, headers=api.headers_for(case.path),
                         verify=api.session.verify, cert=api.session.cert, timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        content_type = response.headers.get("content-type")  # schemathesis: a list per header
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type == PROBLEM, (case.formatted_path, response.headers)
    assert "Traceback" not in response.text


def _fuzz(api: Api, examples: int) -> None:
    """Every operation of the live document, `examples` generated cases each.

    Driven through schemathesis's Python API (operation strategies + hypothesis) rather than its
    pytest plugin, which does not run on pytest 9."""
    operations = [result.ok() for result in schemathesis.openapi.from_dict(api.schema_doc).get_all_operations()]
    assert len(operations) >= 20, "the document lists the API's operations"
    failures = []
    for operation in operations:
        if operation.path in ("/customers/me/session", "/admin/sessions/current"):
            continue  # logging out would end the fuzzer's own sessions

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def run(case) -> None:
            _check(api, case)

        try:
            run()
        except AssertionError as error:
            failures.append(f"{operation.method.upper()} {operation.path}: {str(error)[:400]}")
    assert not failures, "\n".join(failures)


def test_no_server_errors(api: Api) -> None:
    _fuzz(api, examples=6)


@pytest.mark.slow
def test_no_server_errors_long(api: Api) -> None:
    _fuzz(api, examples=100)
