"""The operations files (docs/contract.md, operating limits): the Grafana dashboard and the
Prometheus alert rules use authsrv's real metric names, the rules pass `promtool check rules` and
their own `promtool test rules` cases (one where each alert fires, one where it does not), and
every alert has a runbook entry in docs/operations.md.

promtool comes with the Debian package `prometheus` (.ci/run installs it); without it the promtool
checks are skipped and the rest still runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from authsrv.cluster.metrics import ClusterMetrics
from authsrv.hotpath.external import ExternalMetrics
from authsrv.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "ops" / "grafana" / "authsrv-dashboard.json"
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "ops" / "prometheus" / "alerts_test.yml"
OPERATIONS = REPO / "docs" / "operations.md"

# Metrics the files may use although authsrv's registry does not expose them, each for a stated
# reason. Keep this list short: a name that is here is not checked against the code. (Empty: the
# process collector is registered, so process_* names are checked like the others.)
ALLOWED_ELSEWHERE: set[str] = set()

# PromQL words that are not metric names: aggregations, set operators, functions (followed by "(").
PROMQL_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
}  # fmt: skip
_LABELS = re.compile(r"\{[^{}]*\}")  # label matchers (Grafana variables live inside them)
_RANGES = re.compile(r"\[[^\[\]]*\]")  # [5m], [$__rate_interval]
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_STRINGS = re.compile(r'"[^"]*"|\'[^\']*\'')
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (enough PromQL for the files here)."""
    text = _STRINGS.sub(" ", _LABELS.sub(" ", expr))
    text = _GROUPING.sub(" ", _RANGES.sub(" ", text))
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        rest = text[match.end():].lstrip()
        if word in PROMQL_KEYWORDS or rest.startswith("(") or re.fullmatch(r"[0-9.eE+-]+", word):
            continue  # a function call, an operator, or a number's exponent
        names.add(word)
    return names


def exposed_names() -> set[str]:
    """Every sample name authsrv can expose: the switch's registry with the external-balance,
    retention and write-ahead log metrics, and a cluster node's."""
    metrics = Metrics()
    ExternalMetrics(metrics.registry)

    class Journal:
        evicted_early, activity, closed_count = 0, (), 0

    class Ledger:
        ids_evicted_count = history_trimmed_count = history_entries_count = 0

    class Wal:
        directory, unwritable_reason, write_errors, unwritten_bytes = REPO, None, {}, 0

    metrics.watch_retention(Journal(), Ledger())
    metrics.watch_wal(Wal())
    ClusterMetrics(metrics.registry, "a")
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"), "info": ("_info",), "unknown": ("",)}  # fmt: skip
    names = set()
    for family in metrics.registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    exprs += [annotation["expr"] for annotation in dashboard.get("annotations", {}).get("list", ()) if "expr" in annotation]
    return exprs


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"] for rule in group["rules"]]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    return found


def run_promtool(*args: str, cwd: Path = REPO) -> None:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def test_alert_rules_pass_promtool_check() -> None:
    run_promtool("check", "rules", str(ALERTS.relative_to(REPO)))


def test_alert_rules_pass_their_promtool_tests() -> None:
    run_promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO)))


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]:
        for check in test.get("alert_rule_test", ()):
            cases.setdefault(check["alertname"], set()).add(bool(check.get("exp_alerts")))
    alerts = {rule["alert"] for rule in alert_rules()}
    assert len(alerts) >= 10
    for alert in sorted(alerts):
        assert cases.get(alert) == {True, False}, f"{alert}: cases {cases.get(alert)}"
    assert set(cases) <= alerts, set(cases) - alerts


def test_every_alert_has_a_runbook_entry_in_operations_md() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    runbook = text.partition("\n## Runbook\n")[2]
    assert runbook, "docs/operations.md has no '## Runbook' section"
    entries = set(re.findall(r"^### (\w+)\s*$", runbook, flags=re.M))
    for rule in alert_rules():
        assert rule["alert"] in entries, f"no runbook entry '### {rule['alert']}'"
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["runbook"] == f"docs/operations.md, Runbook: {rule['alert']}"
        assert rule["annotations"]["summary"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query, as recording rules with Grafana's variables filled in."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 25
    rules = [{"record": f"dashboard:query:{number}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")}
             for number, expr in enumerate(exprs)]  # fmt: skip
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    run_promtool("check", "rules", str(path))


def test_dashboard_covers_the_switch_and_its_dependencies() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    for needed in ("authsrv_iso_requests_total", "authsrv_iso_request_seconds_bucket", "authsrv_wal_fsync_seconds_bucket",
                   "authsrv_stand_in_decisions_total", "authsrv_external_call_seconds_bucket", "authsrv_outbox_pending",
                   "authsrv_outbox_dead_letters", "authsrv_ledger_holds_pending", "process_resident_memory_bytes",
                   "authsrv_gc_pause_seconds_bucket", "authsrv_cluster_primary", "authsrv_cluster_lease_age_seconds",
                   "authsrv_cluster_replication_lag_records", "authsrv_cluster_publish_seconds_bucket",
                   "authsrv_cluster_fencing_refusals_total", "authsrv_cluster_takeovers_total"):  # fmt: skip
        assert needed in used, needed
    texts = json.dumps(dashboard)
    assert "by (mti)" in texts and "by (code)" in texts  # the RED view by MTI and response code


def test_every_metric_the_files_use_exists() -> None:
    exposed = exposed_names()
    assert "authsrv_iso_requests_total" in exposed and "authsrv_ready" in exposed
    used: dict[str, set[str]] = {}
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(DASHBOARD.name)
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"{ALERTS.name} {rule['alert']}")
    unknown = {name: sorted(where) for name, where in used.items() if name not in exposed | ALLOWED_ELSEWHERE}
    assert not unknown, f"metrics authsrv does not expose: {unknown}"
    assert "authsrv_wal_disk_free_bytes" in exposed and "authsrv_cluster_primary" in exposed


def test_metric_names_reads_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(authsrv_x_bucket{job=~"$job", le!="1e3"}[5m] offset 1h)))'
            " > 1e-3 and on (job) max without (instance) (authsrv_y) unless authsrv_z == bool 0")
    assert metric_names(expr) == {"authsrv_x_bucket", "authsrv_y", "authsrv_z"}
