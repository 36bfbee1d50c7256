"""`GET`/`PUT /admin/fx-rates`: read and replace the FX rates table (authsrv/hotpath/fx.py).

PUT validates the whole table first (ISO 4217 codes with a minor unit, decimal rates within
bounds, the base at 1, asOf in UTC), then replaces `DIR/fx-rates.json` atomically (write, fsync,
rename, fsync the directory) in a worker thread. The switch re-reads the file when its identity
changes, so the next authorization after the answer converts with the new table.
"""

from __future__ import annotations

import logging

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.hotpath.fx import RATES_FILE_NAME, RatesDocument, RatesError, RatesFile, RatesTable, table_of
from authsrv.rest.auth import Caller
from authsrv.rest.audit import set_before
from authsrv.rest.context import ALL_ROLES, Doc, RestContext, admin_route, invalid, json_response
from authsrv.rest.errors import Title, problem
from authsrv.store.db import Role

log = logging.getLogger("authsrv.rest")

FX_RATES_PATH = "/admin/fx-rates"
FX_WRITE_ROLES = frozenset({Role.admin, Role.manager})
_decoder = msgspec.json.Decoder(RatesDocument)


def rates_file(ctx: RestContext) -> RatesFile | None:
    """The server's rates file (`[fx] rates_file` in the data directory), None without one."""
    if ctx.data_dir is None:
        return None
    name = ctx.config.fx.rates_file if ctx.config is not None else RATES_FILE_NAME
    return RatesFile(ctx.data_dir / name)


def parse_rates(body: bytes) -> RatesTable:
    """A whole table from its JSON document, validated (RatesError names what is wrong)."""
    try:
        return table_of(_decoder.decode(body))
    except msgspec.DecodeError as error:
        raise RatesError(str(error)) from None


def replace_rates(ctx: RestContext, rates: RatesFile, table: RatesTable) -> None:
    """Write the file inside a store transaction that carries it: on a cluster primary the
    new table reaches every standby as part of the shard's log before the caller is answered.
    Blocking (fsync): call from a worker thread. The REST PUT and the panel's edit both call it."""
    store = ctx.store
    with store.transaction():
        rates.replace(table)
        store.add_file(str(rates.path.relative_to(ctx.data_dir)), rates.path.read_bytes())


class FxApi:
    def __init__(self, ctx: RestContext) -> None:
        self._ctx = ctx
        self._rates = rates_file(ctx)

    def routes(self) -> list[Route]:
        return [
            admin_route(FX_RATES_PATH, self.get, method="GET", roles=ALL_ROLES, name="fx.get",
                        doc=Doc(summary="The FX rates table used to convert authorizations without billing fields",
                                response=RatesDocument, problems=(404,))),
            admin_route(FX_RATES_PATH, self.put, method="PUT", roles=FX_WRITE_ROLES, name="fx.put",
                        doc=Doc(summary="Replace the FX rates table (validated, written atomically, used at once)",
                                body=RatesDocument, response=RatesDocument, problems=(400, 403, 503))),
        ]

    async def get(self, request: Request, caller: Caller) -> Response:
        del request, caller
        if self._rates is None:
            return problem(503, Title.INTERNAL_ERROR, "no data directory")
        table = await self._ctx.in_thread(self._rates.table)
        if not table.base:
            return problem(404, Title.FX_RATES_NOT_FOUND, "no FX rates table: every conversion is declined")
        return json_response(table.document)

    async def put(self, request: Request, caller: Caller) -> Response:
        if self._rates is None:
            return problem(503, Title.INTERNAL_ERROR, "no data directory")
        try:
            table = parse_rates(await request.body())
        except RatesError as error:
            return invalid(str(error))
        previous = await self._ctx.in_thread(self._rates.table)
        set_before(request, previous.document if previous.base else None)
        await self._ctx.in_thread(replace_rates, self._ctx, self._rates, table)
        log.info("FX rates replaced by %s: base %s, %d rates, as of %s", caller.admin, table.base,
                 len(table.rates), table.as_of)
        return json_response(table.document)
