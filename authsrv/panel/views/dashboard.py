"""The dashboard `/panel/` (every role): a live view of the switch and the ledger totals.

The figures come from the running server's metrics through the sampler (authsrv/panel/dashboard.py);
the ledger totals per currency are the Balance Summary's (`summary`, authsrv/rest/partner_balances.py).
The page renders whole without JavaScript; `panel.js` replaces the `data-refresh` element every few
seconds with `/panel/dashboard/live`, the same fragment rendered alone. Without metrics (a context
built for unit tests) the page says so instead of showing figures.
"""

from __future__ import annotations

import datetime

import attrs
from starlette.responses import HTMLResponse

from authsrv.iso.currency import by_alpha
from authsrv.panel.app import NAV, PanelApp
from authsrv.panel.dashboard import ChartPoint, Dashboard, sampler_for
from authsrv.rest.context import ALL_ROLES
from authsrv.rest.partner_balances import summary

REFRESH_MS = 3000
CHART_WIDTH = 600
CHART_HEIGHT = 160
CHART_PAD = 28  # room for the axis labels


@attrs.frozen
class Chart:
    """The SVG's polylines (points in the viewBox) and labels; empty points: not enough samples."""

    width: int
    height: int
    rate_points: str
    p99_points: str
    rate_max: float
    p99_max_ms: float
    minutes: float
    points: int


def _nice_max(value: float) -> float:
    """A round upper bound for an axis (1, 2, 5 x 10^n) at or above `value`."""
    if not 0 < value < 1e12:  # nothing to scale (or nothing sensible): one unit
        return 1.0
    scale = 1.0
    while scale * 10 < value:
        scale *= 10
    while scale > value:
        scale /= 10
    for step in (1, 2, 5, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale


def chart_of(points: tuple[ChartPoint, ...], *, width: int = CHART_WIDTH, height: int = CHART_HEIGHT) -> Chart:
    if len(points) < 2:
        return Chart(width, height, "", "", 1.0, 1.0, 0.0, len(points))
    first, last = points[0].wall_s, points[-1].wall_s
    span = max(last - first, 1e-9)
    rate_max = _nice_max(max(point.authorizations_per_s for point in points))
    p99_max = _nice_max(max((point.latency_p99_ms or 0.0) for point in points))
    inner_w, inner_h = width - 2 * CHART_PAD, height - 2 * CHART_PAD

    def xy(point: ChartPoint, value: float, top: float) -> str:
        x = CHART_PAD + inner_w * (point.wall_s - first) / span
        y = CHART_PAD + inner_h * (1 - min(value, top) / top)
        return f"{x:.1f},{y:.1f}"

    rate = " ".join(xy(point, point.authorizations_per_s, rate_max) for point in points)
    p99 = " ".join(xy(point, point.latency_p99_ms, p99_max) for point in points if point.latency_p99_ms is not None)
    return Chart(width, height, rate, p99, rate_max, p99_max, span / 60.0, len(points))


def ledger_totals(ledger) -> list[dict]:
    """The Balance Summary per currency with each currency's minor-unit exponent (for `money`)."""
    if ledger is None:
        return []
    rows = []
    for entry in summary(ledger).currencies:
        currency = by_alpha(entry.currency)
        exponent = currency.exponent if currency is not None else None
        rows.append({"currency": entry.currency, "exponent": 2 if exponent is None else exponent,
                     "users": entry.users, "users_available": entry.users_available,
                     "partners": entry.partners, "wallet": entry.wallet})
    return rows


def may_open(op, path: str) -> bool:
    """Whether the menu offers `path` to this operator (links elsewhere follow the same rule)."""
    return op is not None and any(item.path == path and op.role in item.roles for item in NAV)


def live_values(panel: PanelApp, op=None) -> dict:
    """What the live fragment shows (also the full page's first rendering)."""
    metrics = panel.ctx.metrics
    board: Dashboard | None = sampler_for(metrics).dashboard() if metrics is not None else None
    return {
        "board": board,
        "window": board.window if board is not None else None,
        "chart": chart_of(board.chart) if board is not None else None,
        "totals": ledger_totals(panel.ctx.ledger),
        "updated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "outbox_link": may_open(op, "/panel/outbox"),
    }


def register(panel: PanelApp) -> None:
    @panel.page("/", roles=ALL_ROLES)
    async def dashboard(request, op):
        return panel.render(request, op, "dashboard.html", refresh_ms=REFRESH_MS, **live_values(panel, op))

    @panel.page("/dashboard/live", roles=ALL_ROLES)
    async def live(request, op):
        # Rendered alone (not through panel.render): a refresh must not take the page's flash message.
        body = panel.templates.get_template("dashboard_live.html").render(**live_values(panel, op))
        return HTMLResponse(body)
