"""FX rates: the table every role may read, and an edit form for FX_WRITE_ROLES.

The edit goes through `PUT /admin/fx-rates`'s own steps: the form becomes the same JSON document,
validated by `fx_api.parse_rates` (ISO 4217 codes with a minor unit, decimal rates within bounds, the
base at 1, asOf in UTC), then written by `fx_api.replace_rates` (atomic file replacement inside a
store transaction that carries it to the standbys in cluster mode). The switch converts with the
new table from the next authorization on.
"""

from __future__ import annotations

import datetime
import logging

import msgspec
from starlette.requests import Request

from authsrv.hotpath.fx import RATES_MAX, RatesDocument, RatesError
from authsrv.panel.app import PanelApp
from authsrv.rest.context import ALL_ROLES
from authsrv.rest.fx_api import FX_WRITE_ROLES, parse_rates, rates_file, replace_rates

log = logging.getLogger("authsrv.panel")

RATES_TEXT_MAX = 16 * 1024


def register(panel: PanelApp) -> None:
    rates = rates_file(panel.ctx)

    async def show(request: Request, op, *, status: int = 200, error: str = "", form: dict | None = None):
        table = await panel.ctx.in_thread(rates.table) if rates is not None else None
        current = table.document if table is not None and table.base else None
        if form is None:
            form = {"base": current.base if current else "EUR",
                    "as_of": _now_iso(),
                    "rates": "\n".join(f"{code} {rate}" for code, rate in sorted(current.rates.items())
                                       if code != current.base) if current else ""}
        rows = sorted(current.rates.items()) if current else []
        return panel.render(request, op, "fx_rates.html", status=status, current=current, rows=rows, error=error,
                            form=form, may_edit=op.role in FX_WRITE_ROLES and rates is not None, rates_max=RATES_MAX)

    @panel.page("/fx-rates", roles=ALL_ROLES)
    async def fx_rates(request: Request, op):
        return await show(request, op)

    @panel.action("/fx-rates", roles=FX_WRITE_ROLES)
    async def edit(request: Request, op, form):
        typed = {name: _text(form, name) for name in ("base", "as_of", "rates")}
        if rates is None:
            return await show(request, op, status=503, error="This server has no data directory.", form=typed)
        document = _document(typed)
        if isinstance(document, str):
            return await show(request, op, status=400, error=document, form=typed)
        try:
            table = parse_rates(msgspec.json.encode(document))  # PUT /admin/fx-rates's validation
        except RatesError as error:
            return await show(request, op, status=400, error=f"Not saved: {error}.", form=typed)
        before = await panel.ctx.in_thread(rates.table)
        await panel.ctx.in_thread(replace_rates, panel.ctx, rates, table)
        await panel.audit(op, "fx.rates.replace", "fx-rates", "ok",
                          before=msgspec.to_builtins(before.document) if before.base else None,
                          after=msgspec.to_builtins(table.document))
        log.info("FX rates replaced in the panel by %s: base %s, %d rates, as of %s", op.username, table.base,
                 len(table.rates), table.as_of)
        return panel.redirect(request, "/panel/fx-rates", flash=f"FX rates saved: base {table.base}, "
                              f"{len(table.rates)} rates as of {table.as_of}. The next authorization uses them.")


def _document(typed: dict[str, str]) -> RatesDocument | str:
    """The form as the REST document, or what is wrong with its shape (the rules come after)."""
    if len(typed["rates"]) > RATES_TEXT_MAX:
        return f"Not saved: the rates are longer than {RATES_TEXT_MAX} characters."
    base = typed["base"].strip().upper()
    as_of = typed["as_of"].strip()
    if not base:
        return "Not saved: enter the base currency (e.g. EUR)."
    if not as_of:
        return "Not saved: enter the time the rates are valid from (asOf, UTC, e.g. 2026-12-05T16:00:00Z)."
    found: dict[str, str] = {}
    for number, line in enumerate(typed["rates"].splitlines(), start=1):
        parts = line.replace("=", " ").replace(":", " ").split()
        if not parts:
            continue
        if len(parts) != 2:
            return f"Not saved: rates line {number} must be a currency code and a rate, e.g. USD 1.0842."
        code, rate = parts[0].upper(), parts[1]
        if code in found:
            return f"Not saved: {code[:8]} appears twice in the rates."
        found[code] = rate
    return RatesDocument(base=base, rates=found, as_of=as_of)


def _text(form, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
