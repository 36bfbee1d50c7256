"""The audit log `/panel/audit` (every role) and its CSV export `/panel/audit.csv`.

Every action taken in the panel or through the `/admin` API is an entry (who, what, when, the
before and after values): authsrv/store/db.py writes them, this page only reads. Filters are a GET
form (actor, action, channel, target substring, a date range in UTC), so a filtered view is a link;
pages go by id, newest first (`before=` the last id shown). The export takes the same filters, at
most CSV_ROWS_MAX rows, as an attachment; a cell that a spreadsheet would run as a formula
(starting with = + - @, a tab or a carriage return) is prefixed with a quote (OWASP, CSV injection).
An export is itself written to the log (`audit.export`): it copies operators' actions out.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from urllib.parse import urlencode

import attrs
from starlette.requests import Request
from starlette.responses import Response

from authsrv.panel.app import PanelApp
from authsrv.rest.context import ALL_ROLES
from authsrv.store.db import AUDIT_PAGE_MAX, AuditEntry, AuditQuery

PAGE_ROWS = 50
CSV_ROWS_MAX = AUDIT_PAGE_MAX  # one store query: 10,000 rows
ACTOR_MAX = 64
TARGET_MAX = 128
ACTION_MAX = 64
CHANNELS = ("panel", "api")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
CHANGES_SHOWN_MAX = 40  # keys of one entry shown on the page (the CSV has every value)
CSV_COLUMNS = ("id", "at", "actor", "role", "channel", "action", "target", "outcome", "before", "after", "detail")


@attrs.frozen
class Filters:
    """The form's values as typed (shown back in the form) and the store query they make."""

    actor: str = ""
    action: str = ""
    channel: str = ""
    target: str = ""
    since: str = ""  # YYYY-MM-DD, UTC, inclusive
    until: str = ""  # YYYY-MM-DD, UTC, inclusive (the whole day)

    def query(self) -> AuditQuery:
        return AuditQuery(actor=self.actor, action=self.action, channel=self.channel, target=self.target,
                          since=_day_start(self.since) if self.since else "",
                          until=_day_start(self.until, days=1) if self.until else "")

    def params(self) -> dict[str, str]:
        return {name: value for name, value in attrs.asdict(self).items() if value}


class FilterError(ValueError):
    pass


def _day(text: str, name: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise FilterError(f"{name}: enter a date as YYYY-MM-DD.") from None


def _day_start(day: str, days: int = 0) -> str:
    """The store's timestamp format (utc_now_iso: YYYY-MM-DDTHH:MM:SSZ) at 00:00 of `day` + `days`."""
    start = datetime.date.fromisoformat(day) + datetime.timedelta(days=days)
    return f"{start.isoformat()}T00:00:00Z"


def parse_filters(params) -> Filters:
    """The filters of a query string; FilterError names the field that is wrong."""
    def text(name: str, limit: int) -> str:
        value = params.get(name, "").strip()
        if len(value) > limit:
            raise FilterError(f"{name}: at most {limit} characters.")
        return value

    channel = text("channel", 16)
    if channel and channel not in CHANNELS:
        raise FilterError("channel: choose panel or api.")
    since = _day(text("since", 10), "From") if params.get("since", "").strip() else ""
    until = _day(text("until", 10), "To") if params.get("until", "").strip() else ""
    if since and until and until < since:
        raise FilterError("The end date is before the start date.")
    return Filters(actor=text("actor", ACTOR_MAX), action=text("action", ACTION_MAX), channel=channel,
                   target=text("target", TARGET_MAX), since=since, until=until)


def parse_before(params) -> int:
    text = params.get("before", "").strip()
    if not text:
        return 0
    if not text.isascii() or not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise FilterError("before: a positive entry id.")
    return int(text)


@attrs.frozen
class Change:
    """One value of an entry as shown: its name, before and after ('' where absent)."""

    name: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _json(text: str):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _shown(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def changes_of(entry: AuditEntry) -> list[Change]:
    """The before and after values side by side, per key when both are JSON objects (the panel and
    the domain write them so); otherwise one row with the two texts."""
    before, after = _json(entry.before_json), _json(entry.after_json)
    if before is None and after is None:
        return []
    if isinstance(before, dict | None) and isinstance(after, dict | None):
        before, after = before or {}, after or {}
        return [Change(name, _shown(before.get(name)), _shown(after.get(name)))
                for name in sorted(set(before) | set(after))][:CHANGES_SHOWN_MAX]
    return [Change("", _shown(before), _shown(after))]


def safe_cell(value: str) -> str:
    """A cell a spreadsheet shows as text: formulas are defused with a leading quote."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def csv_of(entries: list[AuditEntry]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for e in entries:
        writer.writerow([str(e.id), *(safe_cell(value) for value in (
            e.at, e.actor, e.role, e.channel, e.action, e.target, e.outcome, e.before_json, e.after_json,
            e.detail))])
    return out.getvalue()


def register(panel: PanelApp) -> None:
    async def page(request: Request, op, filters: Filters, before: int, error: str = "", status: int = 200):
        entries: list[AuditEntry] = []
        if not error:
            entries = await panel.ctx.in_thread(panel.store.audit_page, filters.query(), before_id=before,
                                                limit=PAGE_ROWS + 1)
        more = len(entries) > PAGE_ROWS
        entries = entries[:PAGE_ROWS]
        actions = await panel.ctx.in_thread(panel.store.audit_actions)
        params = filters.params()
        older = f"/panel/audit?{urlencode({**params, 'before': entries[-1].id})}" if more else ""
        newest = f"/panel/audit?{urlencode(params)}" if before else ""
        export = "/panel/audit.csv" + (f"?{urlencode(params)}" if params else "")
        return panel.render(request, op, "audit.html", status=status, entries=entries, changes_of=changes_of,
                            filters=filters,
                            actions=actions, channels=CHANNELS, error=error, older_url=older, newest_url=newest,
                            export_url=export, page_rows=PAGE_ROWS, csv_rows_max=CSV_ROWS_MAX)

    @panel.page("/audit", roles=ALL_ROLES)
    async def audit(request: Request, op):
        try:
            filters = parse_filters(request.query_params)
            before = parse_before(request.query_params)
        except FilterError as error:
            return await page(request, op, _echo(request.query_params), 0, error=str(error), status=400)
        return await page(request, op, filters, before)

    @panel.page("/audit.csv", roles=ALL_ROLES)
    async def export(request: Request, op):
        try:
            filters = parse_filters(request.query_params)
        except FilterError as error:
            return await page(request, op, _echo(request.query_params), 0, error=str(error), status=400)
        entries = await panel.ctx.in_thread(panel.store.audit_page, filters.query(), limit=CSV_ROWS_MAX)
        await panel.audit(op, "audit.export", "audit_log", "ok", after=filters.params() or None,
                          detail=f"{len(entries)} rows")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return Response(csv_of(entries), media_type="text/csv; charset=utf-8", headers={
            "content-disposition": f'attachment; filename="authsrv-audit-{stamp}.csv"'})


def _echo(params) -> Filters:
    """The form's values as sent (bounded), to show them back next to the error."""
    return Filters(**{name: params.get(name, "")[:TARGET_MAX] for name in attrs.fields_dict(Filters)})
