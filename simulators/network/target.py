"""The server under test as a child process: `authsrv` through its CLI, or the floor server.

Used by `make demo` (simulators/demo.py) and `make bench` (bench/). Children run in their own
session so a Ctrl-C in the terminal reaches only the driver, which then stops them in order
(SIGTERM, wait, SIGKILL). Their output goes to a log file, never to a pipe that could fill up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import attrs

from simulators.network.mix import AMOUNT_MINOR_MAX, HotCards

READY_TIMEOUT_S = 60.0  # until /readyz answers 200 (or the floor server accepts a connection)
READY_POLL_S = 0.1
STOP_TIMEOUT_S = 30.0  # SIGTERM to exit: authsrv drains in-flight work first
KILL_TIMEOUT_S = 5.0
CLI_TIMEOUT_S = 600.0  # one `authsrv` command (seed of 100,000 users is contracted at < 60 s)
LOG_TAIL_LINES = 20
HTTP_TIMEOUT_S = 1.0


class TargetError(Exception):
    """The server under test could not be prepared, started or stopped."""


def free_port() -> int:
    """A loopback port that was free a moment ago (the child binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def process_cpu_s(pid: int) -> float:
    """utime + stime of a live process from /proc/PID/stat, in seconds (threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # Field 2 (comm) may contain spaces; everything after its closing parenthesis is fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def authsrv_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "authsrv", *args]


def run_cli(args: list[str], *, log_path: Path, timeout_s: float = CLI_TIMEOUT_S) -> str:
    """Run one command to completion; its stdout is returned, its stderr appended to the log."""
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(args)}\n".encode())
        log.flush()
        try:
            done = subprocess.run(args, stdout=subprocess.PIPE, stderr=log, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise TargetError(f"`{' '.join(args[2:4])}` did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise TargetError(
            f"`{' '.join(args[2:4])}` exited {done.returncode}; log {log_path}:\n{log_tail(log_path)}"
        )
    return done.stdout.decode("utf-8", errors="replace")


@attrs.define
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, name: str, args: list[str], log_path: Path) -> ChildProcess:
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(name, process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    def failure(self, what: str) -> TargetError:
        return TargetError(f"{self.name} {what}; log {self.log_path}:\n{log_tail(self.log_path)}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL. Returns the exit code (negative: signal)."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=KILL_TIMEOUT_S)

    def wait_http_ready(self, url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # bounded by the deadline
            if not self.running():
                raise self.failure(f"exited with {self.process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(READY_POLL_S)
        raise self.failure(f"not ready at {url} within {timeout_s:.0f} s")

    def wait_tcp_ready(self, port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # bounded by the deadline
            if not self.running():
                raise self.failure(f"exited with {self.process.returncode} before it was ready")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S):
                    return
            except OSError:
                time.sleep(READY_POLL_S)
        raise self.failure(f"not accepting on port {port} within {timeout_s:.0f} s")


@attrs.frozen
class Ports:
    iso: int
    rest: int
    metrics: int

    @classmethod
    def free(cls) -> Ports:
        ports: set[int] = set()
        for _ in range(20):  # bounded: three distinct free ports
            ports.add(free_port())
            if len(ports) == 3:
                iso, rest, metrics = sorted(ports)
                return cls(iso, rest, metrics)
        raise TargetError("could not find three free loopback ports")


def hot_users(hot: HotCards, *, users: int, cards_per_user: int) -> int:
    """Users whose cards include the hot ones (the first lines of the cards file), rounded up."""
    assert users > 0 and cards_per_user > 0
    count = -(-hot.count(users * cards_per_user) // cards_per_user)
    assert 0 <= count <= users
    return count


def init_and_seed(data: Path, *, users: int, cards_per_user: int, amount_minor: int, log_path: Path,
                  hot: HotCards = HotCards()) -> Path:  # noqa: B008  (frozen: one shared default is safe)
    """`authsrv init` then `authsrv seed`; returns the cards file.

    With `hot` enabled the hot cards' users are seeded first, each balance funded with
    `hot.funding_factor` times `amount_minor` (mix.py: hot cards are the first lines of the file and
    need that much more to stay approvable for as long as the others), then everyone else."""
    cards_path = data / "cards.jsonl"
    run_cli(authsrv_command("init", "--data", str(data)), log_path=log_path)
    hot_count = hot_users(hot, users=users, cards_per_user=cards_per_user)
    if hot_count:
        hot_amount_minor = amount_minor * hot.funding_factor(users * cards_per_user)
        assert hot_amount_minor <= AMOUNT_MINOR_MAX, "a hot balance must fit field 54 (12 digits)"
        _seed(data, cards_path, users=hot_count, cards_per_user=cards_per_user, amount_minor=hot_amount_minor,
              log_path=log_path)  # fmt: skip
    if users > hot_count:  # none left only when one user's cards are all there is
        _seed(data, cards_path, users=users - hot_count, cards_per_user=cards_per_user, amount_minor=amount_minor,
              log_path=log_path)  # fmt: skip
    if not cards_path.is_file():
        raise TargetError(f"`authsrv seed` wrote no cards file at {cards_path}")
    return cards_path


def _seed(data: Path, cards_path: Path, *, users: int, cards_per_user: int, amount_minor: int,
          log_path: Path) -> None:  # fmt: skip
    """One `authsrv seed` run: it appends its cards to `cards_path` in the order of its users."""
    assert users > 0 and amount_minor > 0
    run_cli(
        authsrv_command(
            "seed", "--data", str(data), "--users", str(users), "--cards-per-user", str(cards_per_user),
            "--amount", str(amount_minor), "--out", str(cards_path),
        ),
        log_path=log_path,
    )  # fmt: skip


def start_authsrv(data: Path, ports: Ports, log_path: Path) -> ChildProcess:
    """`authsrv serve` on the given loopback ports, returned once /readyz answers 200."""
    args = authsrv_command(
        "serve", "--data", str(data), "--iso-port", str(ports.iso), "--rest-port", str(ports.rest),
        "--metrics-port", str(ports.metrics),
    )  # fmt: skip
    server = ChildProcess.start("authsrv serve", args, log_path)
    try:
        server.wait_http_ready(f"http://127.0.0.1:{ports.metrics}/readyz")
    except BaseException:
        server.stop(KILL_TIMEOUT_S)
        raise
    return server


def start_floor(port: int, log_path: Path) -> ChildProcess:
    """bench/floor_server.py (codec + transport only) on `port`, once it accepts connections."""
    args = [sys.executable, "-m", "bench.floor_server", "--port", str(port)]
    server = ChildProcess.start("floor server", args, log_path)
    try:
        server.wait_tcp_ready(port)
    except BaseException:
        server.stop(KILL_TIMEOUT_S)
        raise
    return server


@attrs.frozen
class VerifyResult:
    exit_code: int
    output: str  # the JSON summary `authsrv ledger verify` prints (totals, no card data)


def ledger_verify(data: Path, log_path: Path) -> VerifyResult:
    args = authsrv_command("ledger", "verify", "--data", str(data))
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(args)}\n".encode())
        log.flush()
        try:
            done = subprocess.run(args, stdout=subprocess.PIPE, stderr=log, timeout=CLI_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return VerifyResult(-1, f"ledger verify did not finish within {CLI_TIMEOUT_S:.0f} s")
    return VerifyResult(done.returncode, done.stdout.decode("utf-8", errors="replace").strip())
