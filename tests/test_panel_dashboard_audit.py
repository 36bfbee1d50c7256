"""The panel's dashboard (figures from the running server's metrics, the live fragment, the chart)
and the audit log (filters, paging, CSV export and its formula guard), over real HTTPS; the
sampler's arithmetic (rates, histogram quantiles) without a server."""

from __future__ import annotations

import csv
import io
import re

import pytest
import trio

from authsrv.panel.dashboard import (
    Histo,
    Sample,
    baseline,
    chart_points,
    dashboard_of,
    read_sample,
    window_between,
)
from authsrv.store.db import AuditEntry, AuditQuery
from tests.isoclient import IsoClient, auth
from tests.restclient import https
from tests.test_panel_core import admin_password, panel_login

pytestmark = pytest.mark.timeout(90)


def figure(page: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}">([^<]*)<', page)
    assert found, f"no #{element_id} in the page"
    return found.group(1).strip()


# -- the sampler's arithmetic ----------------------------------------------------------------------

BOUNDS = (0.001, 0.01, 0.1, float("inf"))


def sample(at_s: float, codes: dict, latency: tuple, *, stand_ins: float = 0.0, wal: tuple = (0, 0, 0, 0)) -> Sample:
    return Sample(at_s=at_s, wall_s=1_000_000 + at_s, codes=codes, other_requests=0.0,
                  latency=Histo(BOUNDS, latency), stand_ins=stand_ins, external=Histo(), wal_fsync=Histo(BOUNDS, wal),
                  outbox_pending=0.0, dead_letters=0.0, in_flight=0.0, connections=0.0)


def test_histogram_quantile_interpolates_inside_the_bucket():
    histo = Histo(BOUNDS, (0.0, 50.0, 100.0, 100.0))  # 50 in (1, 10] ms, 50 in (10, 100] ms
    assert histo.quantile(0.5) == pytest.approx(0.01)
    assert histo.quantile(0.25) == pytest.approx(0.001 + 0.009 * 0.5)
    assert histo.quantile(0.99) == pytest.approx(0.01 + 0.09 * 0.98)
    assert Histo(BOUNDS, (0.0, 0.0, 0.0, 0.0)).quantile(0.99) is None  # nothing observed
    assert Histo(BOUNDS, (0.0, 0.0, 0.0, 5.0)).quantile(0.99) == 0.1  # all above the last bound
    assert Histo().quantile(0.5) is None


def test_window_rates_approval_share_and_latency_deltas():
    older = sample(10.0, {"00": 100.0, "51": 10.0}, (100.0, 110.0, 110.0, 110.0), stand_ins=1, wal=(5, 5, 5, 5))
    newer = sample(20.0, {"00": 190.0, "51": 20.0, "14": 10.0}, (100.0, 210.0, 220.0, 220.0), stand_ins=3,
                   wal=(5, 6, 6, 6))
    window = window_between(older, newer)
    assert window.authorizations == 110 and window.authorizations_per_s == pytest.approx(11.0)
    assert window.approval_percent == pytest.approx(100 * 90 / 110)
    assert [(share.code, share.count) for share in window.codes] == [("00", 90), ("14", 10), ("51", 10)]
    # Only this window's answers: 100 in (1, 10] ms and 10 in (10, 100] ms, not the 100 below 1 ms before.
    assert window.latency_p50_ms == pytest.approx(1 + 9 * 55 / 100)
    assert 10 < window.latency_p99_ms < 100
    assert window.stand_ins == 2 and window.wal_fsyncs == 1 and 1 <= window.wal_fsync_p99_ms <= 10
    assert window_between(newer, newer) is None  # no time between: no rate
    idle = window_between(newer, sample(30.0, newer.codes, newer.latency.counts))
    assert idle.authorizations == 0 and idle.approval_percent is None and idle.latency_p99_ms is None


def test_baseline_is_the_window_before_now_and_the_chart_one_point_per_interval():
    stored = [sample(float(t), {"00": 2.0 * t}, (0, 2.0 * t, 2.0 * t, 2.0 * t)) for t in range(0, 100, 10)]
    now = sample(95.0, {"00": 190.0}, (0, 190.0, 190.0, 190.0))
    assert baseline(stored, now).at_s == 60.0  # the newest at least 30 s old
    assert baseline(stored[-1:], now).at_s == 90.0  # only younger ones: the oldest
    assert baseline([], now) is None
    points = chart_points(stored, now)
    assert len(points) == len(stored) and all(point.authorizations_per_s == pytest.approx(2.0) for point in points)
    board = dashboard_of(stored, now)
    assert board.window.authorizations_per_s == pytest.approx(2.0) and board.window.approval_percent == 100.0


def test_read_sample_from_a_metrics_registry():
    from authsrv.hotpath.external import ExternalMetrics
    from authsrv.metrics import Metrics

    metrics = Metrics()
    external = ExternalMetrics(metrics.registry, ["ext"])
    for code, seconds in (("00", 0.002), ("00", 0.003), ("51", 0.004)):
        metrics.answered("0100", code, seconds)
    metrics.answered("0400", "00", 0.001)  # a reversal: not an authorization
    metrics.answered("0100", "\x00bad", 0.001)  # counted under "other" by the metrics
    external.child(external.seconds, "ext").observe(0.02)
    metrics.stand_in.inc()
    metrics.on_wal_commit(3, 100, 0.0004)
    metrics.outbox_dead_letters.set(2)
    reading = read_sample(metrics.registry)
    assert reading.codes == {"00": 2.0, "51": 1.0, "other": 1.0} and reading.other_requests == 1.0
    assert reading.authorizations == 4.0 and reading.approvals == 2.0
    assert reading.latency.count == 5.0 and reading.external.count == 1.0 and reading.wal_fsync.count == 1.0
    assert reading.stand_ins == 1.0 and reading.dead_letters == 2.0 and reading.outbox_pending == 0.0


# -- the dashboard over HTTPS ----------------------------------------------------------------------


async def test_dashboard_figures_move_after_iso_traffic(server, data_dir, cards):
    async with https(data_dir, server.rest_port) as client:
        await panel_login(client, "admin", admin_password(data_dir))
        before = await client.get("/panel/")
        assert before.status_code == 200
        assert 'data-refresh="/panel/dashboard/live"' in before.text
        assert figure(before.text, "auth-total") == "0"
        assert 'id="ledger-totals"' in before.text and "EUR" in before.text

        iso = await IsoClient.connect(server.iso_port)
        for card in cards[:6]:
            assert (await iso.call(auth(card, amount=500, cvc2=card["cvc2"])))["39"] == "00"
        wrong = f"{(int(cards[6]['cvc2']) + 1) % 1000:03d}"
        assert (await iso.call(auth(cards[6], amount=500, cvc2=wrong)))["39"] == "N7"
        await iso.aclose()
        await trio.sleep(0.6)  # the rates need the reading at least half a second after the first sample

        live = await client.get("/panel/dashboard/live")
        assert live.status_code == 200 and live.headers["cache-control"] == "no-store"
        assert "<html" not in live.text  # a fragment, not a page
        assert figure(live.text, "auth-total") == "7"
        assert figure(live.text, "approval-rate") == f"{100 * 6 / 7:.1f} %"
        assert float(figure(live.text, "auth-rate")) > 0
        assert figure(live.text, "latency-p99").endswith(" ms")
        assert figure(live.text, "wal-fsync-p99").endswith(" ms")
        codes = live.text[live.text.index('id="codes"'):]
        assert ">00<" in codes and ">N7<" in codes
        page = await client.get("/panel/")
        assert figure(page.text, "auth-total") == "7"
    # The fragment needs a session like the page.
    async with https(data_dir, server.rest_port) as anonymous:
        refused = await anonymous.get("/panel/dashboard/live")
        assert refused.status_code == 303 and refused.headers["location"].endswith("/panel/login")


async def test_dashboard_chart_after_samples(server, data_dir, cards):
    from authsrv.panel.dashboard import sampler_for

    sampler = sampler_for(server.switch._metrics)
    assert len(sampler.samples) >= 1  # the server's task took its first reading before it was ready
    iso = await IsoClient.connect(server.iso_port)
    for card in cards[:3]:
        await iso.call(auth(card, amount=100, cvc2=card["cvc2"]))
        await trio.sleep(0.6)
        sampler.record()  # as the server's task does every few seconds
    await iso.aclose()
    async with https(data_dir, server.rest_port) as client:
        await panel_login(client, "admin", admin_password(data_dir))
        page = await client.get("/panel/")
    assert '<svg class="chart"' in page.text and 'class="line" points="' in page.text
    points = re.search(r'<polyline class="line" points="([^"]+)"', page.text).group(1).split()
    assert len(points) >= 3


def test_dashboard_without_metrics_renders_a_notice():
    """A context built for unit tests has no Metrics and no ledger: the page says so, no 500."""
    from authsrv.panel.app import PanelApp
    from authsrv.panel.views.dashboard import chart_of, live_values

    class Ctx:
        store = metrics = ledger = None

    panel = PanelApp(Ctx(), attempts=None)
    values = live_values(panel)
    assert values["board"] is None and values["totals"] == []
    html = panel.templates.get_template("dashboard_live.html").render(**values)
    assert "No metrics in this process" in html and "No ledger in this process" in html
    assert chart_of(()).rate_points == ""


# -- the audit log ---------------------------------------------------------------------------------


def _entries(store, count: int, **fields) -> None:
    for number in range(count):
        values = {"actor": "alice", "role": "Manager", "channel": "panel", "action": "card.lock",
                  "target": f"card:{number}", "outcome": "ok", **fields}
        store.append_audit(AuditEntry(0, "", **values))


async def test_audit_filters_and_paging(server, data_dir):
    _entries(server.store, 60)
    _entries(server.store, 2, actor="bob", action="kyc.accept", channel="api", target="customer:77")
    server.store.append_audit(AuditEntry(0, "2020-01-02T10:00:00Z", "carol", "Admin", "panel", "fx.update",
                                         "fx-rates", "ok"))
    async with https(data_dir, server.rest_port) as client:
        await panel_login(client, "admin", admin_password(data_dir))
        first = await client.get("/panel/audit")
        assert first.status_code == 200
        ids = [int(n) for n in re.findall(r'<td data-label="#">(\d+)</td>', first.text)]
        assert len(ids) == 50 and ids == sorted(ids, reverse=True)
        older = re.search(r'<a href="([^"]+)" rel="next">Older</a>', first.text).group(1).replace("&amp;", "&")
        second = await client.get(older)
        more = [int(n) for n in re.findall(r'<td data-label="#">(\d+)</td>', second.text)]
        assert more and max(more) < min(ids) and "Newest" in second.text

        bob = await client.get("/panel/audit", params={"actor": "bob"})
        assert bob.text.count('<td data-label="Who">bob</td>') == 2 and "alice</td>" not in bob.text
        api = await client.get("/panel/audit", params={"channel": "api", "target": "customer:7"})
        assert api.text.count("kyc.accept</td>") == 2
        assert '<option value="kyc.accept"' in api.text  # the actions logged so far are the choices
        lock = await client.get("/panel/audit", params={"action": "card.lock", "target": "card:5"})
        targets = re.findall(r'<td data-label="Target">([^<]*)</td>', lock.text)
        assert sorted(targets) == ["card:5", "card:50", "card:51", "card:52", "card:53", "card:54", "card:55",
                                   "card:56", "card:57", "card:58", "card:59"]
        old = await client.get("/panel/audit", params={"since": "2020-01-02", "until": "2020-01-02"})
        assert re.findall(r'<td data-label="Who">([^<]*)</td>', old.text) == ["carol"]
        none = await client.get("/panel/audit", params={"until": "2020-01-01"})
        assert "No entries match these filters" in none.text

        for bad in ({"since": "yesterday"}, {"since": "2026-02-01", "until": "2026-01-01"}, {"channel": "x"},
                    {"before": "-1"}, {"actor": "a" * 65}):
            refused = await client.get("/panel/audit", params=bad)
            assert refused.status_code == 400 and 'class="error"' in refused.text, bad


async def test_audit_csv_export_with_filters_and_formula_guard(server, data_dir):
    _entries(server.store, 3, actor="mallory", target="=HYPERLINK(\"http://evil\")")
    server.store.append_audit(AuditEntry(0, "", "mallory", "Employee", "panel", "card.lock", "+cmd", "ok",
                                         "", "", "@SUM(A1)"))
    server.store.append_audit(AuditEntry(0, "", "mallory", "Employee", "panel", "card.lock", "-2", "ok",
                                         "{\"status\": \"ACTIVE\"}", "", ""))
    _entries(server.store, 2, actor="trent")
    async with https(data_dir, server.rest_port) as client:
        await panel_login(client, "admin", admin_password(data_dir))
        page = await client.get("/panel/audit", params={"actor": "mallory"})
        assert 'href="/panel/audit.csv?actor=mallory"' in page.text
        assert "status: <del>ACTIVE</del> → <strong>—</strong>" in page.text
        reply = await client.get("/panel/audit.csv", params={"actor": "mallory"})
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/csv")
        assert reply.headers["content-disposition"].startswith("attachment; filename=")
        assert reply.headers["cache-control"] == "no-store"
        rows = list(csv.reader(io.StringIO(reply.text)))
        assert rows[0][:3] == ["id", "at", "actor"] and len(rows) == 1 + 5
        assert {row[2] for row in rows[1:]} == {"mallory"}
        targets = [row[6] for row in rows[1:]]
        assert targets[0] == "'-2" and targets[1] == "'+cmd" and targets[2] == "'=HYPERLINK(\"http://evil\")"
        assert rows[2][10] == "'@SUM(A1)" and rows[1][8] == "{\"status\": \"ACTIVE\"}"
        for row in rows[1:]:
            assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row), row
        assert (await client.get("/panel/audit.csv", params={"since": "nope"})).status_code == 400
    exports = server.store.audit_page(AuditQuery(action="audit.export"))
    assert exports and exports[0].actor == "admin" and exports[0].detail == "5 rows"


def test_audit_changes_side_by_side():
    from authsrv.panel.views.audit import Change, changes_of

    def entry(before: str, after: str) -> AuditEntry:
        return AuditEntry(1, "", "a", "Admin", "panel", "card.lock", "card:1", "ok", before, after)

    lock = changes_of(entry('{"status": "ACTIVE", "lockReason": 0, "pan": "535522******2312"}',
                            '{"status": "LOCKED", "lockReason": 3, "pan": "535522******2312"}'))
    assert lock == [Change("lockReason", "0", "3"), Change("pan", "535522******2312", "535522******2312"),
                    Change("status", "ACTIVE", "LOCKED")]
    assert [c.changed for c in lock] == [True, False, True]
    assert changes_of(entry("", '{"rates": {"USD": 1.1}}')) == [Change("rates", "", '{"USD": 1.1}')]
    assert changes_of(entry("plain text", "")) == [Change("", "plain text", "")]
    assert changes_of(entry("", "")) == []


async def test_dashboard_links_only_to_pages_the_role_may_open(server, data_dir):
    from tests.restclient import admin_login, bearer

    async with https(data_dir, server.rest_port) as client:
        token = await admin_login(client, "admin", admin_password(data_dir))
        created = await client.post("/admin/users", headers=bearer(token),
                                    json={"username": "emp2", "role": "Employee", "password": "e" * 14})
        assert created.status_code == 201
        await panel_login(client, "admin", admin_password(data_dir))
        assert 'href="/panel/outbox"' in (await client.get("/panel/dashboard/live")).text
    async with https(data_dir, server.rest_port) as employee:
        await panel_login(employee, "emp2", "e" * 14)
        for path in ("/panel/", "/panel/dashboard/live"):
            page = await employee.get(path)
            assert page.status_code == 200 and 'href="/panel/outbox"' not in page.text, path
            assert 'id="dead-letters"' in page.text  # the figure itself is for every role


async def test_sampler_task_keeps_a_bounded_window(autojump_clock):
    from authsrv.metrics import Metrics
    from authsrv.panel.dashboard import DashboardSampler

    metrics = Metrics()
    sampler = DashboardSampler(metrics, interval_s=3.0, samples_max=5, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(sampler.run)
        assert len(sampler.samples) == 1
        for second in range(60):
            metrics.answered("0100", "00" if second % 4 else "51", 0.002)
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(sampler.samples) == 5  # 20 readings taken, the oldest dropped
    times = [sample.at_s for sample in sampler.samples]
    assert [b - a for a, b in zip(times, times[1:], strict=False)] == [3.0] * 4
    window = sampler.dashboard().window
    assert window is not None and window.approval_percent == pytest.approx(75.0, abs=10)


def test_chart_axes_and_points():
    from authsrv.panel.dashboard import ChartPoint
    from authsrv.panel.views.dashboard import CHART_PAD, _nice_max, chart_of

    maxima = [_nice_max(v) for v in (0, 0.01, 0.3, 3, 10, 30, 101, float("inf"))]
    assert maxima == pytest.approx([1, 0.01, 0.5, 5, 10, 50, 200, 1])
    points = (ChartPoint(100.0, 0.0, None), ChartPoint(103.0, 4.0, 20.0), ChartPoint(106.0, 2.0, 10.0))
    chart = chart_of(points, width=200, height=100)
    inner_w, bottom = 200 - 2 * CHART_PAD, 100 - CHART_PAD
    assert chart.rate_max == 5 and chart.p99_max_ms == 20 and chart.minutes == pytest.approx(0.1)
    xy = [tuple(map(float, pair.split(","))) for pair in chart.rate_points.split()]
    assert xy[0] == (CHART_PAD, bottom) and xy[-1][0] == CHART_PAD + inner_w
    assert xy[1][1] == pytest.approx(bottom - (100 - 2 * CHART_PAD) * 4 / 5, abs=0.1)
    assert len(chart.p99_points.split()) == 2  # no point where no answer was timed
