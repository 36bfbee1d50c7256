"""`python -m bench.nats_bridge`: what one publish costs authsrv's process, three ways.

nats-py is asyncio; authsrv is trio. Measured on a 3-server loopback NATS cluster (R3,
`sync_interval: always`), sequential publishes of 300-byte records, process CPU per publish:
- plain asyncio (nats-py alone, no trio): the cost of the client itself;
- the thread bridge authsrv uses (`ledger.jetstream.StreamLog`: its own asyncio loop in a thread,
  appends and acknowledgements handed across), for groups of 1, 8 and 32 records;
- trio-asyncio (nats-py's loop run inside trio's thread), when the package is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import trio

from authsrv.cluster.devnats import NatsCluster
from authsrv.cluster.shard import Shard
from ledger.jetstream import NatsBridge, StreamLog

RECORD = b"x" * 300


async def plain_asyncio(urls: list[str], count: int) -> str:
    import nats
    from nats.js.api import StreamConfig

    connection = await nats.connect(servers=urls)
    js = connection.jetstream()
    await js.add_stream(StreamConfig(name="BRIDGE_A", subjects=["bridge.a"], num_replicas=3))
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(count):
        await js.publish("bridge.a", RECORD, headers={"Nats-Expected-Last-Sequence": str(i)})
    line = _line("plain asyncio", count, cpu, wall)
    await connection.close()
    return line


async def thread_bridge(urls: list[str], count: int) -> list[str]:
    bridge = NatsBridge(urls, name="bench")
    await trio.to_thread.run_sync(bridge.connect)
    shard = Shard(bridge, shard="bridge", replicas=3, lease_s=3)
    await bridge.call(shard.ensure())
    log = StreamLog(bridge, stream=shard.names.stream, subject=shard.names.subject, term=1, last_seq=0,
                    stream_last=0)
    lines = []
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run_committer)
        for per_group in (1, 8, 32):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(count):
                for _ in range(per_group):
                    seq = log.append(RECORD)
                await log.wait_durable(seq)
            lines.append(_line(f"thread bridge, {per_group:2} records/group", count, cpu, wall, per_group))
        nursery.cancel_scope.cancel()
    bridge.close()
    return lines


async def trio_asyncio_run(urls: list[str], count: int) -> str:
    try:
        import trio_asyncio
    except ImportError:
        return "trio-asyncio: not installed (pip install trio-asyncio)"
    import nats
    from nats.js.api import StreamConfig

    async with trio_asyncio.open_loop():
        connection = await trio_asyncio.aio_as_trio(nats.connect)(servers=urls)
        js = connection.jetstream()
        await trio_asyncio.aio_as_trio(js.add_stream)(StreamConfig(name="BRIDGE_T", subjects=["bridge.t"],
                                                                    num_replicas=3))
        publish = trio_asyncio.aio_as_trio(js.publish)
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(count):
            await publish("bridge.t", RECORD, headers={"Nats-Expected-Last-Sequence": str(i)})
        line = _line("trio-asyncio", count, cpu, wall)
        await trio_asyncio.aio_as_trio(connection.close)()
    return line


def _line(name: str, count: int, cpu: float, wall: float, per_group: int = 1) -> str:
    cpu_us = (time.process_time() - cpu) / count * 1e6
    return (f"{name:32} {cpu_us:6.0f} us CPU per group ({cpu_us / per_group:5.0f} per record),"
            f" {(time.perf_counter() - wall) / count * 1e3:.2f} ms per group")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nats_bridge")
    parser.add_argument("--count", type=int, default=1000, help="groups per variant (bounded: at most 100,000)")
    args = parser.parse_args(argv)
    count = max(1, min(args.count, 100_000))
    with tempfile.TemporaryDirectory(prefix="authsrv-bridge-") as work, NatsCluster.create(Path(work), 3) as nats:
        time.sleep(1.0)  # JetStream elects its meta leader
        print(asyncio.run(plain_asyncio(nats.urls, count)))
        for line in trio.run(thread_bridge, nats.urls, count):
            print(line)
        print(trio.run(trio_asyncio_run, nats.urls, count))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
