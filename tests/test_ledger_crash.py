"""kill -9 at random moments: every acknowledged operation survives, none is applied twice.

The child (tests/crash_child.py) acknowledges an operation only after wait_durable. The parent
SIGKILLs it 0.2-1.0 s into its load, restarts it for the next round (new ids, plus re-submissions
of operations acknowledged earlier), and after every round opens the directory itself and checks:
- each acknowledged operation is in the ledger in the state its kind implies;
- the balances equal what the operations found in the ledger imply (each moves one unit), so
  nothing was applied twice and nothing is there that no operation explains;
- the invariants hold, `verify` passes, and a fresh replay gives the same digest.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import attrs
import pytest

from ledger.durable import DurableLedger
from ledger.state import HoldState
from ledger.verify import verify
from tests.crash_child import FUNDS, SETTLEMENT, USER, kind_of, op_id

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
KILL_DELAY_S = (0.2, 1.0)
SEGMENT_SIZE_MAX_TEST = 256 * 1024  # small segments: rotation and truncation happen under load
# What the child prints for each kind (TransferStatus numbers, see ledger/types.py).
ACK_STATUSES = {"pp": "0,0", "hold": "0", "fail": "25,1"}
RESUB_STATUSES = {"pp": ("3,3", "24,1"), "hold": ("3", "24"), "fail": ("25,1", "25,1")}


@attrs.define
class Round:
    number: int
    concurrency: int
    acked: dict[int, str] = attrs.field(factory=dict)  # op id -> statuses printed
    resubmitted: dict[int, tuple[str, str]] = attrs.field(factory=dict)
    snapshots: list[int] = attrs.field(factory=list)
    setup: str = ""
    stderr: str = ""


@attrs.define
class Plan:
    concurrency: int
    snapshot_after_s: float | None = None
    snapshots_max: int = 1
    snapshot_mode: str = "sync"


def run_round(directory: Path, number: int, plan: Plan, resubmit: list[int], rng: random.Random) -> Round:
    command = [
        sys.executable, "-m", "tests.crash_child",
        "--dir", str(directory),
        "--round", str(number),
        "--concurrency", str(plan.concurrency),
        "--resubmit", "[" + ",".join(map(str, resubmit)) + "]",
        "--segment-size-max", str(SEGMENT_SIZE_MAX_TEST),
    ]
    if plan.snapshot_after_s is not None:
        command += ["--snapshot-after-s", str(plan.snapshot_after_s),
                    "--snapshots-max", str(plan.snapshots_max), "--snapshot-mode", plan.snapshot_mode]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    errors: list[str] = []
    readers = [
        threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True),
        threading.Thread(target=lambda: errors.extend(child.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    # A snapshot round is killed only after its first snapshot, so that one always exists.
    awaited = "SNAP " if plan.snapshot_after_s is not None else "READY\n"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not any(line.startswith(awaited) for line in lines):  # bounded by READY_TIMEOUT_S
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            child.wait()
            for reader in readers:
                reader.join(5)
            pytest.fail(f"round {number}: child never printed {awaited!r}:\n{''.join(errors)[-3000:]}")
        time.sleep(0.01)
    time.sleep(rng.uniform(*KILL_DELAY_S))
    child.send_signal(signal.SIGKILL)
    returncode = child.wait(10)
    for reader in readers:
        reader.join(10)
    assert returncode == -signal.SIGKILL, f"round {number}: the child died before the kill " \
        f"(exit {returncode}):\n{''.join(errors)[-3000:]}"
    return parse(number, plan.concurrency, lines, "".join(errors))


def parse(number: int, concurrency: int, lines: list[str], stderr: str) -> Round:
    result = Round(number, concurrency, stderr=stderr)
    for line in lines:
        if not line.endswith("\n"):
            continue  # cut by the kill: never acknowledged
        word, *rest = line.split()
        if word == "ACK":
            result.acked[int(rest[0])] = rest[1]
        elif word == "RESUB":
            result.resubmitted[int(rest[0])] = (rest[1], rest[2])
        elif word == "SNAP":
            result.snapshots.append(int(rest[0]))
        elif word == "SETUP":
            result.setup = rest[0]
    return result


def check_round_output(result: Round) -> None:
    assert result.setup == ("0" if result.number == 0 else "3"), result.stderr[-2000:]
    assert result.acked, f"round {result.number} acknowledged nothing:\n{result.stderr[-2000:]}"
    for op, printed in result.acked.items():
        assert printed == ACK_STATUSES[kind_of(op)], (op, printed)
    for op, printed in result.resubmitted.items():
        assert printed == RESUB_STATUSES[kind_of(op)], (op, printed)


def check_directory(directory: Path, rounds: list[Round]) -> str:
    """Open the directory as a restarted server would; check it against every acknowledgement."""
    durable = DurableLedger.open(directory)
    ledger = durable.ledger
    try:
        for result in rounds:
            for op in result.acked:
                hold = ledger.hold(2 * op)
                kind = kind_of(op)
                if kind == "pp":
                    assert hold is not None and hold.state == HoldState.posted, op
                    assert ledger.transfer_status(2 * op + 1) == 0, op
                elif kind == "hold":
                    assert hold is not None and hold.state == HoldState.pending, op
                else:
                    assert hold is None, op
        found = Counter()
        for result in rounds:
            # Ops are numbered in the order workers take them; at most `concurrency` were taken
            # and not acknowledged, so nothing of this round lies beyond this bound.
            scan_k_max = len(result.acked) + result.concurrency + 64
            for k in range(1, scan_k_max + 1):
                op = op_id(result.number, k)
                hold = ledger.hold(2 * op)
                if hold is None:
                    continue
                kind = kind_of(op)
                assert kind != "fail", op
                expected = HoldState.posted if kind == "pp" else HoldState.pending
                assert hold.state == expected and hold.amount == 1, (op, hold)
                found[kind] += 1
        user, settlement = ledger.account(USER), ledger.account(SETTLEMENT)
        # Every unit moved is explained by exactly one operation found above: none twice.
        assert (user.credits_posted, user.debits_posted, user.debits_pending) == (
            FUNDS, found["pp"], found["hold"])
        assert (settlement.credits_posted, settlement.credits_pending) == (found["pp"], found["hold"])
        assert ledger.pending_count() == found["hold"]
        acked_pp = sum(1 for r in rounds for op in r.acked if kind_of(op) == "pp")
        assert found["pp"] >= acked_pp
        ledger.check_invariants()
        digest = ledger.digest()
    finally:
        durable.close()
    report = verify(directory)  # a fresh replay of the same directory, and a cross-check
    assert report.ok and report.digest == digest, report.problems
    return digest


def crash_loop(directory: Path, plans: list[Plan], seed: int) -> list[Round]:
    rng = random.Random(seed)
    rounds: list[Round] = []
    for number, plan in enumerate(plans):
        earlier = [op for result in rounds for op in result.acked]
        resubmit = rng.sample(earlier, min(4, len(earlier)))
        result = run_round(directory, number, plan, resubmit, rng)
        check_round_output(result)
        assert set(result.resubmitted) == set(resubmit)
        if plan.snapshot_after_s is not None:
            assert result.snapshots
        rounds.append(result)
        check_directory(directory, rounds)
    return rounds


def test_kill_nine_loses_no_acknowledged_operation(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 2**32))
    plans = [Plan(32), Plan(64, snapshot_after_s=0.05, snapshots_max=3, snapshot_mode="sync"), Plan(16)]
    rounds = crash_loop(tmp_path / "ledger", plans, seed)
    assert sum(len(r.acked) for r in rounds) > 100, f"seed {seed}"
    snapshots = sorted(p.name for p in (tmp_path / "ledger").glob("snapshot-*"))
    assert snapshots, "the snapshot round must leave a snapshot behind"


@pytest.mark.slow
def test_kill_nine_soak(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    plans = []
    for number in range(24):
        concurrency = rng.choice([1, 8, 64, 256])
        if number % 3 == 1:
            plans.append(Plan(concurrency, snapshot_after_s=0.05, snapshots_max=6, snapshot_mode="mixed"))
        else:
            plans.append(Plan(concurrency))
    rounds = crash_loop(tmp_path / "ledger", plans, seed)
    assert sum(len(r.acked) for r in rounds) > 1000, f"seed {seed}"
