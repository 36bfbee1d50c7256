"""[server] slow_step_ms: what holds the event loop is logged and counted, and only that."""

from __future__ import annotations

import gc
import logging
import time
import urllib.request

import pytest
import trio
from prometheus_client import CollectorRegistry, Histogram

from authsrv.loopwatch import KINDS, LoopWatch, kind_of, watch_loop
from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth


def histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("slow", "test", ["kind"], buckets=(0.005, 0.05, 1), registry=registry)


def count(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("slow_count", {"kind": kind}) or 0.0


def test_task_names_map_to_a_fixed_set_of_kinds() -> None:
    assert kind_of("authsrv.iso.server.IsoServer._read_all") == "iso"
    assert kind_of("anycorn.task_group._handle") == "rest"
    assert kind_of("authsrv.clearing.engine.something") == "clearing"
    assert kind_of("ledger.durable.DurableLedger.run") == "ledger"
    assert kind_of("0100\x00 whatever a peer might send") == "other"
    assert set(KINDS) == {"iso", "rest", "ledger", "clearing", "gc", "other"}


async def test_a_step_held_past_the_threshold_is_logged_and_counted_and_a_short_one_is_not(caplog) -> None:
    registry, family = histogram()
    caplog.set_level(logging.WARNING, logger="authsrv.loopwatch")

    async def blocks_the_loop() -> None:
        await trio.lowlevel.checkpoint()
        time.sleep(0.06)  # the whole loop waits: what the watch is for

    async def quick() -> None:
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_loop, 20, family)
        await trio.sleep(0.01)  # installed
        nursery.start_soon(quick, name="authsrv.iso.server.quick")
        await trio.sleep(0.01)
        assert count(registry, "iso") == 0
        nursery.start_soon(blocks_the_loop, name="authsrv.iso.server.slow")
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert count(registry, "iso") == 1
    assert registry.get_sample_value("slow_sum", {"kind": "iso"}) >= 0.06
    [line] = [record.getMessage() for record in caplog.records]
    assert "event loop held" in line and "authsrv.iso.server.slow" in line and "CPU" in line
    # Removed with the service: nothing is counted once it is gone.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocks_the_loop, name="authsrv.iso.server.slow")
    assert count(registry, "iso") == 1


def test_a_long_collection_is_counted_as_gc_whichever_thread_runs_it(caplog) -> None:
    registry, family = histogram()
    watch = LoopWatch(0.001, family)
    caplog.set_level(logging.WARNING, logger="authsrv.loopwatch")
    garbage = []
    for _ in range(200_000):  # cycles: only the collector frees them
        node: list = []
        node.append(node)
        garbage.append(node)
    del garbage, node
    gc.callbacks.append(watch.on_gc)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(watch.on_gc)
    assert count(registry, "gc") >= 1
    assert any("garbage collection of generation 2" in record.getMessage() for record in caplog.records)


def test_off_by_default_and_bounded_by_the_config() -> None:
    import msgspec

    from authsrv.config import ConfigError, decode_config, render_default_config

    config = decode_config(render_default_config().encode(), source="authsrv.toml")
    assert config.server.slow_step_ms == 0
    with pytest.raises((ConfigError, msgspec.ValidationError)):
        decode_config(render_default_config().replace("slow_step_ms = 0", "slow_step_ms = -1").encode(),
                      source="authsrv.toml")


async def test_the_server_exposes_what_held_its_loop(data_dir, cards) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, server__slow_step_ms=30)
        client = await IsoClient.connect(server.iso_port)
        assert (await client.call(auth(cards[0], amount=10)))["39"] == "00"
        await trio.lowlevel.checkpoint()
        time.sleep(0.05)  # this test's own step holds the server's loop

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
                return reply.read().decode()

        text = await trio.to_thread.run_sync(scrape)
        server.stop.set()
    counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("authsrv_loop_slow_step_seconds_count")}
    assert counts.get('authsrv_loop_slow_step_seconds_count{kind="other"}', 0) >= 1, counts
    assert cards[0]["pan"] not in text
