"""The fee table: each card program's fees (account and card creation, monthly per card and per
account, POS, e-commerce, ATM, currency conversion) over the `[fees]` defaults, and its edit.

    page / action                         roles
    GET  /panel/fees                      all
    POST /panel/fees/{configId}           Admin (there is no REST API for fees: Admin only)

An edit writes the program's `fees_json` in the store (authsrv/store/program_fees.py: durable,
replicated) and then forgets the running switch's FeeBook cache (`ctx.fees`), so the next
authorization of the program charges the new fees; creation fees and `authsrv fees run` read the
store each time. The `[fees]` defaults are the configuration file's (changed there, with a restart).
"""

from __future__ import annotations

import logging
import re

import msgspec
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from authsrv.config import FEE_AMOUNT_MAX, FEE_BP_MAX, FeesConfig
from authsrv.hotpath.fees import FeesError
from authsrv.panel.app import PanelApp
from authsrv.panel.security import Operator
from authsrv.panel.views.balances import exponent_of
from authsrv.rest.context import ALL_ROLES
from authsrv.store.db import Role
from authsrv.store.program_fees import FEE_KEYS, ProgramNotFound, edit_program_fees, fee_table

log = logging.getLogger("authsrv.panel")

EDITORS = frozenset({Role.admin})
# key -> (label, unit): "amount" in minor units of the program's currency, "bp" in basis points.
FEE_ROWS: dict[str, tuple[str, str]] = {
    "account_creation": ("Account creation", "amount"),
    "card_creation": ("Card creation", "amount"),
    "monthly_per_card": ("Monthly fee per card", "amount"),
    "monthly_per_account": ("Monthly fee per account", "amount"),
    "pos_fixed": ("POS purchase, fixed", "amount"),
    "pos_bp": ("POS purchase, percentage", "bp"),
    "ecommerce_fixed": ("E-commerce purchase, fixed", "amount"),
    "ecommerce_bp": ("E-commerce purchase, percentage", "bp"),
    "atm_fixed": ("ATM withdrawal, fixed", "amount"),
    "atm_bp": ("ATM withdrawal, percentage", "bp"),
    "fx_bp": ("Currency conversion, percentage", "bp"),
    "monthly_waiver_spend": ("No monthly fees after spending more than (0: never waived)", "amount"),
}
assert tuple(FEE_ROWS) == FEE_KEYS, "every fee of FeesConfig has its row"
_INTEGER = re.compile(r"^[0-9]{1,12}$")


def defaults_of(panel: PanelApp) -> FeesConfig:
    config = panel.ctx.config
    return config.fees if config is not None else FeesConfig()


def register(panel: PanelApp) -> None:
    ctx = panel.ctx

    async def render(request: Request, op: Operator, *, status: int = 200, error: str = "", error_program: str = "",
                     typed: dict | None = None) -> Response:
        defaults = defaults_of(panel)
        programs = await ctx.in_thread(fee_table, panel.store, defaults)
        return panel.render(request, op, "fees_table.html", status=status, programs=programs,
                            defaults=msgspec.structs.asdict(defaults), rows=FEE_ROWS, can_edit=op.role in EDITORS,
                            error=error, error_program=error_program, typed=typed or {},
                            amount_max=FEE_AMOUNT_MAX, bp_max=FEE_BP_MAX, asdict=msgspec.structs.asdict,
                            exponent_of=exponent_of)

    @panel.page("/fees", roles=ALL_ROLES)
    async def fees(request: Request, op: Operator) -> Response:
        return await render(request, op)

    @panel.action("/fees/{configId}", roles=EDITORS)
    async def edit(request: Request, op: Operator, form: FormData) -> Response:
        config_id = request.path_params["configId"]
        typed = {key: _text(form, key).strip() for key in FEE_KEYS}
        bad = [FEE_ROWS[key][0] for key, text in typed.items() if not _INTEGER.match(text)]
        if bad:
            return await render(request, op, status=400, error_program=config_id, typed=typed,
                                error="Fees are whole numbers at or above 0 (amounts in minor units, percentages in "
                                f"basis points): check {', '.join(bad)}.")
        values = {key: int(text) for key, text in typed.items()}
        try:
            changed = await ctx.in_thread(edit_program_fees, panel.store, config_id, values, defaults_of(panel))
        except ProgramNotFound:
            return panel.not_found(request, op, "card program")
        except FeesError as error:
            return await render(request, op, status=400, error_program=config_id, typed=typed,
                                error=f"A fee is above its bound (amounts at most {FEE_AMOUNT_MAX:,}, percentages at "
                                f"most {FEE_BP_MAX:,} basis points): {error}")
        if ctx.fees is not None:
            ctx.fees.forget()  # the running switch reads the program's new fees at its next authorization
        await panel.audit(op, "fees.edit", f"program:{config_id}", "ok", before=changed.before, after=changed.after)
        log.info("panel %s set the fees of program %s: %s", op.username, config_id, changed.after)
        return panel.redirect(request, "/panel/fees",
                              flash=f"Fees of program {config_id} saved: the next transaction uses them.")


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""
