"""The `cluster` target of `make bench`: a shard of a primary and a standby on 3 NATS servers.

The same seeded cards and realistic mix as the `authsrv` target, stepped against the primary, so
the knee's ratio to the single node's (same run) is what replication costs. Its CPU per 1,000 adds
the three NATS servers to the primary (they run on the same cores). Then `kills` rounds: kill -9 of
whichever node is primary, the time until the other answers /readyz 200, one purchase approved on
it, the killed node restarted as a standby and caught up before the next round.
"""

from __future__ import annotations

import functools
import os
import signal
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import attrs
import msgspec
import trio

from authsrv.cluster.devnats import NatsCluster
from simulators.network.target import (
    ChildProcess,
    Ports,
    TargetError,
    authsrv_command,
    init_and_seed,
    ledger_verify,
    process_cpu_s,
    run_cli,
    start_authsrv,
)

LEASE_S = 3
KILLS_DEFAULT = 10
CATCH_UP_TIMEOUT_S = 60.0


class ClusterFigures(msgspec.Struct, frozen=True, kw_only=True):
    """Takeovers after kill -9 of the primary (seconds from the kill to /readyz 200 on the other)."""

    lease_s: float
    kills: int
    takeover_s: list[float]
    median_s: float | None
    max_s: float | None
    within_bound: bool  # every takeover within lease_s + 2
    approved_after_each: bool  # a purchase was approved on every new primary
    ledger_verify_exit_code: int | None = None
    error: str | None = None


def nats_cpu_s(nats: NatsCluster) -> float:
    """CPU seconds of the NATS servers still running (they share the cores with the primary)."""
    return sum(process_cpu_s(server.process.pid) for server in nats.servers
               if server.process is not None and server.process.poll() is None)


@attrs.define
class _Node:
    data: Path
    ports: Ports
    log_path: Path
    child: ChildProcess | None = None

    def start(self) -> None:
        args = authsrv_command("serve", "--data", str(self.data), "--iso-port", str(self.ports.iso),
                               "--rest-port", str(self.ports.rest), "--metrics-port", str(self.ports.metrics))
        self.child = ChildProcess.start(f"authsrv serve ({self.data.name})", args, self.log_path)
        self.child.wait_http_ready(self.url("/healthz"))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}{path}"

    def primary(self) -> bool:
        try:
            with urllib.request.urlopen(self.url("/readyz"), timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(self.url("/metrics"), timeout=2) as reply:
                for line in reply.read().decode().splitlines():
                    if line.startswith((name + "{", name + " ")):
                        return float(line.rsplit(" ", 1)[1])
        except OSError:
            return None
        return None


def cluster_table(nats: NatsCluster, node: str) -> str:
    urls = ", ".join(f'"{url}"' for url in nats.urls)
    return f'\n[cluster]\nnats = [{urls}]\nshard = "bench"\nnode = "{node}"\nreplicas = 3\nlease_s = {LEASE_S}\n'


def bench_cluster(config, work: Path, log: Callable[[str], None], *, kills: int = KILLS_DEFAULT):  # noqa: ANN201
    """(TargetResult, ClusterFigures | None), like bench_authsrv with a standby and the kill rounds."""
    from bench.harness import ServerWithHelpers, TargetResult, run_steps, sustained_rate
    from simulators.network.pinblock import load_zpk

    nats = NatsCluster.create(work / "nats", 3)
    n1 = _Node(work / "cluster-n1", Ports.free(), work / "cluster-n1.log")
    n2 = _Node(work / "cluster-n2", Ports.free(), work / "cluster-n2.log")
    steps, reason, error, figures = [], "not started", None, None
    try:
        nats.start()
        log(f"cluster: 3 NATS servers (sync_interval always); init + seed {config.users} users in {n1.data}")
        cards_path = init_and_seed(n1.data, users=config.users, cards_per_user=config.cards_per_user,
                                   amount_minor=config_seed_amount(), log_path=n1.log_path, hot=config.hot)
        with open(n1.data / "authsrv.toml", "a") as settings:
            settings.write(cluster_table(nats, "n1"))
        run_cli(authsrv_command("cluster", "join", "--data", str(n2.data), "--from", str(n1.data), "--node", "n2"),
                log_path=n1.log_path)
        n1.child = start_authsrv(n1.data, n1.ports, n1.log_path)  # returns once it is the primary
        n2.start()
        zpk = load_zpk(n1.data / "keys" / "zpk.hex")
        try:
            steps, reason = run_steps("cluster", ServerWithHelpers(n1.child, functools.partial(nats_cpu_s, nats)), port=n1.ports.iso,
                                      cards_path=cards_path, zpk=zpk, config=config, log=log)
        except (TargetError, OSError, ValueError) as failure:
            reason, error = "load failed", str(failure)
        figures = kill_rounds([n1, n2], cards_path, kills, log)
    except (TargetError, OSError, ValueError, TimeoutError) as failure:
        error = str(failure)
    finally:
        verify_code = None
        primary = next((node for node in (n1, n2) if node.child is not None and node.child.running()
                        and node.primary()), None)
        if primary is not None:
            verify_code = ledger_verify(primary.data, primary.log_path).exit_code
        exit_codes = [node.child.stop() for node in (n1, n2) if node.child is not None]
        nats.stop()
    if figures is not None:
        figures = msgspec.structs.replace(figures, ledger_verify_exit_code=verify_code)
    log(f"cluster: ledger verify on the last primary exit {verify_code}")
    result = TargetResult(name="cluster", steps=steps, sustained_rate_per_s=sustained_rate(steps, config),
                          stop_reason=reason, error=error, server_exit_code=exit_codes[0] if exit_codes else None,
                          ledger_verify_exit_code=verify_code)
    return result, figures


def config_seed_amount() -> int:
    from bench.harness import SEED_AMOUNT_MINOR

    return SEED_AMOUNT_MINOR


def kill_rounds(nodes: list[_Node], cards_path: Path, kills: int, log: Callable[[str], None]) -> ClusterFigures:
    import json

    from simulators.cluster_demo import call, purchase

    cards = [json.loads(line) for line in cards_path.read_text().splitlines()[:50]]
    takeovers: list[float] = []
    approved_all = True
    for round_number in range(kills):
        primary = next(node for node in nodes if node.primary())
        standby = next(node for node in nodes if node is not primary)
        wait_caught_up(standby, primary)
        os.kill(primary.child.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        primary.child.process.wait(10)
        deadline = killed_at + LEASE_S + 30
        while not standby.primary():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no takeover within {LEASE_S + 30} s (round {round_number + 1})")
            time.sleep(0.01)
        takeovers.append(time.monotonic() - killed_at)
        answer = trio.run(call, standby.ports.iso, purchase(cards[round_number % len(cards)], 900_000 + round_number))
        approved = answer is not None and answer.get("39") == "00"
        approved_all = approved_all and approved
        log(f"cluster: kill {round_number + 1}/{kills}: takeover {takeovers[-1]:.2f} s, "
            f"purchase on the new primary {'approved' if approved else answer}")
        primary.start()  # back as a standby
    return ClusterFigures(lease_s=LEASE_S, kills=kills, takeover_s=[round(t, 3) for t in takeovers],
                          median_s=statistics.median(takeovers) if takeovers else None,
                          max_s=max(takeovers) if takeovers else None,
                          within_bound=all(t <= LEASE_S + 2 for t in takeovers), approved_after_each=approved_all)


def wait_caught_up(standby: _Node, primary: _Node) -> None:
    """The standby applied what the primary had acknowledged a moment ago (its lease renewals publish
    nothing, so the primary's figure only moves with traffic)."""
    target = primary.metric("authsrv_cluster_applied_seq") or 0
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while (standby.metric("authsrv_cluster_applied_seq") or 0) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{standby.data.name} did not catch up within {CATCH_UP_TIMEOUT_S} s")
        time.sleep(0.05)
