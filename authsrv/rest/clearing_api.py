"""`POST /admin/clearing`: apply an uploaded clearing file (docs/contract.md, clearing file) on the running server.

The body is the file itself, JSON Lines (`application/x-ndjson` or `text/plain`), up to
CLEARING_FILE_BYTES_MAX (ProblemMiddleware's per-path bound). The engine runs on the trio thread
that owns the ledger, chunk by chunk, waiting for each chunk to be durable before the next, so
authorizations keep flowing meanwhile (authsrv/clearing/engine.py). The answer is the
reconciliation summary; the same file sent again answers its first summary with
`duplicateFile: true` and changes nothing. Runs are serialized: one file at a time.
`ingest_clearing` is the whole step; the panel's upload (authsrv/panel/views/clearing.py) calls it too.
"""

from __future__ import annotations

import logging
import weakref

import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv import cardsec
from authsrv.clearing import CLEARING_FILE_BYTES_MAX, ClearingDeps, ClearingFileError, ClearingSummary, apply_clearing
from authsrv.rest.auth import Caller
from authsrv.rest.context import Doc, RestContext, admin_route, json_response
from authsrv.rest import money
from authsrv.rest.errors import CLEARING_BODY_BYTES_MAX, Title, problem
from authsrv.store.db import Role

log = logging.getLogger("authsrv.rest")

CLEARING_PATH = "/admin/clearing"
assert CLEARING_BODY_BYTES_MAX == CLEARING_FILE_BYTES_MAX  # the body bound is the file bound
CLEARING_MEDIA_TYPES = frozenset({"application/x-ndjson", "text/plain"})
CLEARING_ROLES = frozenset({Role.admin, Role.manager})
FILE_NAME_HEADER = "x-file-name"  # optional: the name the summary reports
FILE_NAME_LENGTH_MAX = 255


class ClearingUnavailable(Exception):
    """The running ledger (with its journal, keys and card index) is not there: nothing applied."""


_locks: weakref.WeakKeyDictionary[object, trio.Lock] = weakref.WeakKeyDictionary()  # per store


async def ingest_clearing(ctx: RestContext, body: bytes, name: str) -> ClearingSummary:
    """Apply one clearing file on the running server: the REST endpoint and the panel's upload.
    Runs are serialized (one file at a time, so the summaries stay exact). Raises
    ClearingUnavailable, money.LedgerNotWritable (the log cannot be written now) and
    ClearingFileError (the file as a whole is refused)."""
    journal = getattr(ctx.ledger, "journal", None)
    if ctx.ledger is None or journal is None or ctx.keys is None or ctx.index is None:
        raise ClearingUnavailable("clearing needs the running ledger")
    money.check_writable(ctx.ledger)  # LEDGER_UNAVAILABLE while the log cannot be written
    deps = ClearingDeps(ledger=ctx.ledger, journal=journal, index=ctx.index,
                        vault=cardsec.PanVault(ctx.keys), store=ctx.store, planner=ctx.clearing_planner)
    lock = _locks.setdefault(ctx.store, trio.Lock())
    rate_max = ctx.config.clearing.records_per_second_max if ctx.config is not None else 0
    async with lock:
        return await apply_clearing(deps, body, name[:FILE_NAME_LENGTH_MAX], records_per_second_max=rate_max)


def clearing_routes(ctx: RestContext) -> list[Route]:
    async def ingest(request: Request, caller: Caller) -> Response:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media not in CLEARING_MEDIA_TYPES:
            return problem(415, Title.INVALID_PAYLOAD,
                           "send the clearing file as application/x-ndjson or text/plain")
        if ctx.ledger is None or getattr(ctx.ledger, "journal", None) is None or ctx.keys is None or (
                ctx.index is None):
            return problem(503, Title.INTERNAL_ERROR, "clearing needs the running ledger")
        money.check_writable(ctx.ledger)  # 503 LEDGER_UNAVAILABLE while the log cannot be written
        body = await request.body()
        name = request.headers.get(FILE_NAME_HEADER, "upload")[:FILE_NAME_LENGTH_MAX]
        try:
            summary = await ingest_clearing(ctx, body, name)
        except ClearingUnavailable as error:
            return problem(503, Title.INTERNAL_ERROR, str(error))
        except ClearingFileError as error:
            return problem(400, Title.INVALID_PAYLOAD, str(error))
        log.info("clearing %s by %s: %d records, %d applied, %d exceptions%s", name, caller.admin,
                 summary.lines, summary.applied, summary.exceptions_count,
                 " (duplicate file)" if summary.duplicate_file else "")
        return json_response(summary)

    return [
        admin_route(CLEARING_PATH, ingest, method="POST", roles=CLEARING_ROLES, name="clearing.ingest",
                    doc=Doc(summary="Apply a clearing file (JSON Lines body) and return the reconciliation summary",
                            response=ClearingSummary, problems=(400, 413, 415, 503))),
    ]
