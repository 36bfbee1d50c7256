"""`make demo` with its two partners (issue 5): `demo` (internal balances) and `ext` (external
balances at the partner simulator, a process of its own answering in 5 ms)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_demo_refuses_an_external_share_that_leaves_a_partner_without_load(tmp_path: Path) -> None:
    from simulators.demo import main

    for share in ("0", "1", "1.5"):
        assert main(["--external-share", share, "--data", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_drives_an_internal_and_an_external_partner(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    done = subprocess.run(
        [sys.executable, "-m", "simulators.demo", "--seconds", "5", "--users", "200", "--rate", "200",
         "--data", str(data)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-2000:]
    assert "RESULT: PASS" in out and "ledger verify: PASS" in out
    assert "partner demo (internal balances): 00: " in out and "partner ext (external balances): 00: " in out
    calls = re.search(r"partner ext: external calls (\d+) \(([^)]*)\)", out)
    assert calls and int(calls.group(1)) > 0 and "approved: " in calls.group(2)
    assert "call latency mean" in out
    # the cards of each partner, and the simulator's own log, stay in the data directory
    assert (data / "cards.jsonl").stat().st_size > 0 and (data / "cards-ext.jsonl").stat().st_size > 0
    assert (data / "partner-sim.log").exists()
    assert 'balance_mode = "external"' in (data / "authsrv.toml").read_text()


@pytest.mark.slow
def test_demo_cluster_fails_over_with_nothing_lost() -> None:
    done = subprocess.run([sys.executable, "-m", "simulators.cluster_demo", "--duration", "10", "--rate", "50",
                           "--users", "50"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-2000:]
    assert "lost on the new primary: 0" in out and "ledger verify on n2: passed" in out
    assert "n1 restarted: standby" in out and out.rstrip().endswith("PASS")
    takeover = float(re.search(r"takeover: ([\d.]+) s after kill -9", out).group(1))
    assert takeover <= 5.0
