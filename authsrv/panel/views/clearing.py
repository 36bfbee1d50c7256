"""Clearing: upload a clearing file, see its reconciliation summary and exceptions, list past files.

The upload (`POST /panel/clearing/upload`, multipart, the file in the field `file`) runs the very
step of `POST /admin/clearing` (`clearing_api.ingest_clearing`: same engine, same serialization,
same duplicate-file rule) for the same roles (CLEARING_ROLES); its body bound is the REST one plus
multipart framing (errors.PANEL_CLEARING_BODY_BYTES_MAX). Every role may look at the files.
"""

from __future__ import annotations

import logging
import re

import msgspec
from starlette.datastructures import UploadFile
from starlette.requests import Request

from authsrv.clearing import CLEARING_FILE_BYTES_MAX, ClearingFileError
from authsrv.clearing.summary import summary_decoder
from authsrv.panel.app import PanelApp
from authsrv.panel.views.transactions import exponent
from authsrv.rest.clearing_api import CLEARING_ROLES, FILE_NAME_LENGTH_MAX, ClearingUnavailable, ingest_clearing
from authsrv.rest.context import ALL_ROLES
from authsrv.rest.errors import PANEL_CLEARING_BODY_BYTES_MAX
from authsrv.rest.money import LedgerNotWritable
from authsrv.store import panel_transactions as queries

log = logging.getLogger("authsrv.panel")

FILES_PAGE = 25
SHA256 = re.compile(r"[0-9a-f]{64}")
CURSOR = re.compile(r"[0-9T:.Z+-]{10,40}[0-9a-f]{64}")


def register(panel: PanelApp) -> None:
    async def list_page(request: Request, op, *, error: str = "", status: int = 200):
        before = request.query_params.get("before", "")
        if before and not CURSOR.fullmatch(before):
            before, error, status = "", "Page: follow the Older link to page on.", 400
        files = await panel.ctx.in_thread(queries.clearing_files, panel.store, before=before, limit=FILES_PAGE + 1)
        more = len(files) > FILES_PAGE
        files = files[:FILES_PAGE]
        rows = [(row, _summary(row.summary_json)) for row in files]
        next_url = f"/panel/clearing?before={files[-1].received_at}{files[-1].sha256}" if more else ""
        return panel.render(request, op, "clearing.html", status=status, rows=rows, error=error,
                            may_upload=op.role in CLEARING_ROLES, next_url=next_url,
                            first_url="/panel/clearing" if before else "", file_max=CLEARING_FILE_BYTES_MAX)

    @panel.page("/clearing", roles=ALL_ROLES)
    async def clearing(request: Request, op):
        return await list_page(request, op)

    @panel.action("/clearing/upload", roles=CLEARING_ROLES, form_bytes_max=PANEL_CLEARING_BODY_BYTES_MAX)
    async def upload(request: Request, op, form):
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return await list_page(request, op, error="Choose a clearing file (JSON Lines) to upload.", status=400)
        try:
            body = await upload.read(CLEARING_FILE_BYTES_MAX + 1)
        finally:
            await upload.close()
        name = (upload.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:FILE_NAME_LENGTH_MAX] or "upload"
        if not body.strip():
            return await list_page(request, op, error="The file is empty.", status=400)
        try:
            summary = await ingest_clearing(panel.ctx, body, name)
        except ClearingFileError as error:
            await panel.audit(op, "clearing.upload", name, "refused", detail=str(error))
            return await list_page(request, op, error=f"The file was refused, nothing applied: {error}.", status=400)
        except (ClearingUnavailable, LedgerNotWritable) as error:
            await panel.audit(op, "clearing.upload", name, "unavailable", detail=str(error))
            return await list_page(request, op, error=f"Clearing is unavailable now, nothing applied: {error}",
                                   status=503)
        outcome = "duplicate file" if summary.duplicate_file else "applied"
        await panel.audit(op, "clearing.upload", f"clearing:{summary.file_sha256}", outcome, after={
            "name": name, "lines": summary.lines, "applied": summary.applied, "matched": summary.matched,
            "exceptions": summary.exceptions_count, "duplicateFile": summary.duplicate_file})
        log.info("clearing %s uploaded in the panel by %s: %d records, %d applied, %d exceptions%s", name,
                 op.username, summary.lines, summary.applied, summary.exceptions_count,
                 " (duplicate file)" if summary.duplicate_file else "")
        flash = ("The same file was applied before: nothing changed. Its first summary follows."
                 if summary.duplicate_file else
                 f"Applied {summary.applied} of {summary.lines} records; {summary.exceptions_count} exceptions.")
        return panel.redirect(request, f"/panel/clearing/{summary.file_sha256}", flash=flash)

    @panel.page("/clearing/{sha256}", roles=ALL_ROLES)
    async def clearing_file(request: Request, op):
        sha256 = request.path_params["sha256"]
        if not SHA256.fullmatch(sha256):
            return panel.not_found(request, op, "clearing file")
        row = await panel.ctx.in_thread(queries.clearing_file, panel.store, sha256)
        if row is None:
            return panel.not_found(request, op, "clearing file")
        states = await panel.ctx.in_thread(queries.clearing_file_states, panel.store, sha256)
        return panel.render(request, op, "clearing_file.html", file=row, summary=_summary(row.summary_json),
                            states=states, exponent=exponent)


def _summary(text: str):
    if not text:
        return None
    try:
        return summary_decoder.decode(text)
    except msgspec.DecodeError:
        return None
