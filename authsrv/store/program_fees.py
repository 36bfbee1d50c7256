"""The fee table as operators edit it: each card program's `fees_json` (programs table) over the
`[fees]` defaults of authsrv.toml (authsrv/hotpath/fees.py).

An edit is durable in the store (the programs row, written in a store transaction, so it survives
a restart and reaches a cluster standby) and reaches the running switch when the caller forgets
the switch's FeeBook cache (`RestContext.fees.forget()`): the next authorization of the program
reads the new schedule. Creation fees and `authsrv fees run` read the programs row each time.

Overrides: a program keeps the keys it already overrides (with their new values) and gains the
keys whose submitted value differs from what it charged; every other key follows the defaults.
"""

from __future__ import annotations

import json

import attrs
import msgspec

from authsrv.config import FeesConfig
from authsrv.hotpath.fees import FeesError, schedule_of
from authsrv.store.db import _PROGRAM_COLUMNS, ProgramRow, Store

PROGRAMS_LISTED_MAX = 1_000
FEE_KEYS = tuple(field.name for field in msgspec.structs.fields(FeesConfig))


@attrs.frozen
class ProgramFees:
    program: ProgramRow
    schedule: FeesConfig  # what the program charges now
    overridden: frozenset[str]  # keys the program sets itself (the rest: the defaults)
    problem: str = ""  # the stored fees_json is invalid (the switch charges the defaults)


@attrs.frozen
class FeeEdit:
    config_id: str
    before: dict  # the program's overrides before and after (the audit's values)
    after: dict


class ProgramNotFound(LookupError):
    pass


def overrides_of(fees_json: str) -> dict:
    """The keys a program's fees_json sets ({} when it is not a JSON object)."""
    try:
        found = json.loads(fees_json or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def program_fees(program: ProgramRow, defaults: FeesConfig) -> ProgramFees:
    try:
        schedule = schedule_of(program.fees_json, defaults)
    except FeesError as error:
        return ProgramFees(program, defaults, frozenset(), str(error))
    return ProgramFees(program, schedule, frozenset(overrides_of(program.fees_json)) & frozenset(FEE_KEYS))


def fee_table(store: Store, defaults: FeesConfig) -> list[ProgramFees]:
    """Every card program with the schedule it charges, by configId."""
    with store._lock:
        rows = store._conn.execute(
            f"SELECT {_PROGRAM_COLUMNS} FROM programs ORDER BY config_id LIMIT ?", (PROGRAMS_LISTED_MAX,)).fetchall()
    return [program_fees(ProgramRow(*row), defaults) for row in rows]


def edit_program_fees(store: Store, config_id: str, values: dict[str, int], defaults: FeesConfig) -> FeeEdit:
    """Set the program's fees to `values` (every key of FeesConfig, already checked to be integers
    >= 0). Raises ProgramNotFound, or FeesError naming the key whose value is out of bounds."""
    assert set(values) == set(FEE_KEYS), sorted(values)
    with store.transaction():
        program = store.get_program(config_id)
        if program is None:
            raise ProgramNotFound(config_id)
        current = program_fees(program, defaults)
        before = {key: value for key, value in overrides_of(program.fees_json).items()}
        charged = msgspec.structs.asdict(current.schedule)
        after = {key: values[key] for key in FEE_KEYS if key in current.overridden or values[key] != charged[key]}
        fees_json = json.dumps(after, sort_keys=True)
        schedule_of(fees_json, defaults)  # FeesError: a value above its bound
        store._conn.execute("UPDATE programs SET fees_json = ? WHERE config_id = ?", (fees_json, config_id))
    return FeeEdit(config_id, before, after)
