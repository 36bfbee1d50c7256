"""`authsrv clearing ingest --data DIR FILE`: apply a clearing file offline, or through the running server.

When no server holds the data directory's lock, the ledger and journal are rebuilt exactly as the
server does (snapshot + log replay, authsrv.app.open_ledger_and_journal), the file is applied, the
log flushed and a snapshot written. When the server is running, the file goes to its
`POST /admin/clearing` over HTTPS (CA `DIR/pki/ca.crt`, admin `admin`, password from
`DIR/admin-password`, port from `DIR/run.json`). Either way the summary is printed and written as
JSON to `FILE.summary.json` (or `--summary-out`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from authsrv.clearing.records import CLEARING_FILE_BYTES_MAX, ClearingFileError
from authsrv.clearing.summary import ClearingSummary, summary_decoder

ADMIN_USERNAME = "admin"
HTTP_TIMEOUT_S = 600.0  # a large file is applied chunk by chunk before the answer comes
EXIT_OK = 0
EXIT_REFUSED = 2


class IngestError(Exception):
    """The file could not be applied at all (unreadable, too large, server unreachable)."""


def ingest_main(data_dir: Path, file: Path, summary_out: Path | None) -> int:
    try:
        data = _read(file)
        summary = _apply(Path(data_dir), data, file.name)
    except (IngestError, ClearingFileError) as error:
        print(f"authsrv clearing ingest: {error}", file=sys.stderr)
        return EXIT_REFUSED
    out = summary_out if summary_out is not None else file.with_name(file.name + ".summary.json")
    out.write_bytes(summary.to_json() + b"\n")
    print(summary.render())
    print(f"summary written to {out}")
    return EXIT_OK


def _read(file: Path) -> bytes:
    try:
        size = file.stat().st_size
        if size > CLEARING_FILE_BYTES_MAX:
            raise IngestError(f"{file}: larger than {CLEARING_FILE_BYTES_MAX} bytes")
        return file.read_bytes()
    except OSError as error:
        raise IngestError(f"{file}: {error.strerror or error}") from None


def _apply(data_dir: Path, data: bytes, name: str) -> ClearingSummary:
    from authsrv.store.db import DataDirBusy, DataDirLock

    if not (data_dir / "authsrv.toml").exists():
        raise IngestError(f"{data_dir} is not a data directory")
    try:
        lock = DataDirLock.acquire(data_dir)
    except DataDirBusy:
        return apply_via_server(data_dir, data, name)
    with lock:
        return apply_offline(data_dir, data, name)


def apply_offline(data_dir: Path, data: bytes, name: str) -> ClearingSummary:
    """With the data directory's lock held by the caller: the server is not running."""
    from authsrv import cardsec
    from authsrv.app import offline_state
    from authsrv.clearing.engine import ClearingDeps, apply_clearing_offline

    keys = cardsec.CardKeys.load(data_dir / "keys")
    with offline_state(data_dir) as state:
        deps = ClearingDeps(ledger=state.ledger, journal=state.journal, index=state.index,
                            vault=cardsec.PanVault(keys), store=state.store)
        summary = apply_clearing_offline(deps, data, name)
        state.changed = not summary.duplicate_file
    return summary


def apply_via_server(data_dir: Path, data: bytes, name: str) -> ClearingSummary:
    import httpx

    from authsrv.pki import client_ssl_context

    try:
        port = json.loads((data_dir / "run.json").read_text())["rest_port"]
        password = (data_dir / "admin-password").read_text().strip()
    except (OSError, ValueError, KeyError) as error:
        raise IngestError(f"the server holds {data_dir} but its run.json or admin-password is unreadable:"
                          f" {error}") from None
    context = client_ssl_context(data_dir / "pki")
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=HTTP_TIMEOUT_S) as client:
            login = client.post("/admin/sessions", json={"username": ADMIN_USERNAME, "password": password})
            if login.status_code not in (200, 201):
                raise IngestError(f"admin login refused: {login.status_code} {login.text[:200]}")
            token = login.json()["token"]
            reply = client.post("/admin/clearing", content=data,
                                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson",
                                         "X-File-Name": name})
    except httpx.HTTPError as error:
        raise IngestError(f"the running server did not answer: {error}") from None
    if reply.status_code != 200:
        raise IngestError(f"the server refused the file: {reply.status_code} {reply.text[:500]}")
    try:
        return summary_decoder.decode(reply.content)
    except msgspec.DecodeError as error:
        raise IngestError(f"the server's summary does not decode: {error}") from None
