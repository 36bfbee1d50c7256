"""Shared fixtures: a seeded data directory (built once, copied per test) and servers on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import attrs
import msgspec
import pytest
import trio

SEED_USERS = 20
SEED_CARDS_PER_USER = 2
SEED_AMOUNT = 100_000


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory) -> Path:
    from authsrv.store.init import init_data_dir
    from authsrv.store.seed import seed

    data = tmp_path_factory.mktemp("template") / "data"
    init_data_dir(data)
    seed(data, users=SEED_USERS, cards_per_user=SEED_CARDS_PER_USER, amount=SEED_AMOUNT, progress=False)
    return data


@pytest.fixture
def data_dir(template_dir: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(template_dir, data)
    return data


@pytest.fixture
def cards(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "cards.jsonl").read_text().splitlines()]


@pytest.fixture
def zpk(data_dir: Path) -> bytes:
    return bytes.fromhex((data_dir / "keys" / "zpk.hex").read_text().strip())


@attrs.define
class InProcessServer:
    iso_port: int
    metrics_port: int
    rest_port: int
    switch: object
    ledger: object
    journal: object
    store: object
    index: object
    stop: trio.Event
    clearing_planner: object = None  # authsrv.clearing.remote.ClearingPlanner (None: a cluster primary)


async def start_in_process(nursery, data_dir: Path, **overrides) -> InProcessServer:
    from authsrv.app import run_server
    from authsrv.config import load_config

    config = load_config(data_dir)
    for section_key, value in overrides.items():  # e.g. ledger__snapshot_interval_records=50
        section, key = section_key.split("__")
        changed = msgspec.structs.replace(getattr(config, section), **{key: value})
        config = msgspec.structs.replace(config, **{section: changed})
    stop = trio.Event()
    info = await nursery.start(run_server, data_dir, config, {"iso": 0, "rest": 0, "metrics": 0}, stop)
    return InProcessServer(info["iso_port"], info["metrics_port"], info["rest_port"], info["switch"], info["ledger"],
                           info["journal"], info["store"], info["index"], stop, info.get("clearing_planner"))


@pytest.fixture
async def server(data_dir: Path):
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir)
        yield handle
        handle.stop.set()


class ServerProcess:
    """`python -m authsrv serve` as a real subprocess (for signals and kill -9)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.iso_port = self.metrics_port = self.rest_port = 0

    def start(self, timeout_s: float = 30) -> "ServerProcess":
        run_file = self.data_dir / "run.json"
        run_file.unlink(missing_ok=True)
        self.log = open(self.data_dir / "serve.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "authsrv", "serve", "--data", str(self.data_dir), "--iso-port", "0",
             "--rest-port", "0", "--metrics-port", "0"],
            stdout=self.log, stderr=self.log,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()[-2000:]}")
            if run_file.exists():
                info = json.loads(run_file.read_text())
                if info["pid"] == self.proc.pid:
                    self.iso_port, self.metrics_port = info["iso_port"], info["metrics_port"]
                    self.rest_port = info["rest_port"]
                    if self.ready():
                        return self
            time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def read_log(self) -> str:
        return (self.data_dir / "serve.log").read_text(errors="replace")

    def terminate(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def server_process(data_dir: Path):
    process = ServerProcess(data_dir)
    yield process
    process.cleanup()


def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "authsrv", *args], capture_output=True, text=True,
                          timeout=timeout_s)
