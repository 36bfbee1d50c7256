"""Metric labels take values from fixed sets only (docs/operations.md, "Hostile input"): hostile ISO
input cannot add series. Fuzzes a server on loopback, then counts series per family."""

from __future__ import annotations

import random
import struct
import urllib.request

import trio

from authsrv import metrics as metrics_module
from authsrv.iso import codec
from authsrv.iso.framing import frame
from tests import isofuzz

FRAMES = 4000
SEED = 15
# Every authsrv family's series after the fuzz: the request counter's bound is its two fixed label
# sets multiplied; no other family has more than a handful.
REQUESTS_SERIES_MAX = (len(metrics_module.MTI_LABELS) + 1) * (len(metrics_module.CODE_LABELS) + 1)
OTHER_FAMILY_SERIES_MAX = 32


async def send_and_drain(port: int, payloads: list[bytes], sentinel_stan: str, timeout_s: float) -> int:
    """Send every payload framed on one connection, then an echo; read answers until the echo's.
    Returns the number of answers read. Bounded by `timeout_s`."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    sentinel = isofuzz.network(sentinel_stan, transmission="0101000000")
    answers = 0
    with trio.fail_after(timeout_s):
        async with stream, trio.open_nursery() as nursery:

            async def writer() -> None:
                for start in range(0, len(payloads), 200):
                    await stream.send_all(b"".join(frame(p) for p in payloads[start:start + 200]))
                await stream.send_all(frame(isofuzz.payload(sentinel)))

            nursery.start_soon(writer)
            buffer = bytearray()
            while True:
                chunk = await stream.receive_some(65536)
                assert chunk, "the server closed a connection whose framing was intact"
                buffer += chunk
                while len(buffer) >= 2:
                    (size,) = struct.unpack(">H", buffer[:2])
                    if len(buffer) < 2 + size:
                        break
                    answer = codec.decode(bytes(buffer[2:2 + size]))  # the server only sends valid frames
                    del buffer[:2 + size]
                    answers += 1
                    if answer["t"] == "0810" and (answer.get("11"), answer.get("7")) == (sentinel_stan, "0101000000"):
                        return answers


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def check_bounded(exposition: str) -> dict[str, int]:
    """Assert the label sets and series bounds; return the series count of each family."""
    families = isofuzz.series_by_family(exposition)
    assert isofuzz.control_characters_in_labels(families) == []
    counts = {name: len(label_sets) for name, label_sets in families.items()}
    mtis = metrics_module.MTI_LABELS | {metrics_module.OTHER}
    codes = metrics_module.CODE_LABELS | {metrics_module.OTHER}
    for labels in families["authsrv_iso_requests"]:
        values = dict(labels)
        assert values["mti"] in mtis and values["code"] in codes, values
    for name, count in counts.items():
        # A counter's `_created` samples are a family of their own in the text format.
        requests = name.removesuffix("_created") == "authsrv_iso_requests"
        bound = REQUESTS_SERIES_MAX if requests else OTHER_FAMILY_SERIES_MAX
        assert count <= bound, (name, count, sorted(families[name])[:20])
    return counts


async def test_hostile_frames_add_no_series(server, cards):
    rng = random.Random(SEED)
    seeds = isofuzz.seed_payloads(cards)
    payloads = list(isofuzz.hostile_payloads(rng, seeds, FRAMES))
    # The harshest case on its own: valid messages whose MTI is replaced by control characters.
    payloads += [bytes(rng.choice(isofuzz.CONTROL) for _ in range(4)) + seed[4:] for seed in seeds * 20]
    answered = await send_and_drain(server.iso_port, payloads, "999999", timeout_s=120)
    assert answered > FRAMES // 4  # most mutations still decode far enough to be answered
    exposition = await trio.to_thread.run_sync(scrape, server.metrics_port)
    counts = check_bounded(exposition)
    assert 2 <= counts["authsrv_iso_requests"] <= REQUESTS_SERIES_MAX
    assert 'mti="other"' in exposition  # the unknown MTIs were counted, under `other`
    assert "authsrv_iso_internal_errors_total 0.0" in exposition  # every frame: an answer or a documented error
    # The server still answers a valid request.
    client_answer = await send_and_drain(server.iso_port, [], "888888", timeout_s=10)
    assert client_answer == 1


def test_label_values_fall_back_to_other():
    registry_metrics = metrics_module.Metrics()
    for mti in ("0100", "0101", "0Q00", "\x00\x01\x02\x03", "01-0", "0300"):
        registry_metrics.answered(mti, "00", 0.001)
    registry_metrics.answered("0100", "\x07X", 0.001)
    registry_metrics.answered("0100", "00", 0.001)
    from prometheus_client import generate_latest

    families = isofuzz.series_by_family(generate_latest(registry_metrics.registry).decode())
    assert families["authsrv_iso_requests"] == {
        (("code", "00"), ("mti", "0100")),
        (("code", "00"), ("mti", "0101")),
        (("code", "00"), ("mti", "other")),
        (("code", "other"), ("mti", "0100")),
    }
    assert len(registry_metrics._request_children) <= 4  # the cache is keyed by label values, not by raw input


def test_partner_labels_are_the_configured_partners():
    from prometheus_client import CollectorRegistry, generate_latest

    from authsrv.hotpath.external import ExternalMetrics

    registry = CollectorRegistry()
    own = ExternalMetrics(registry, ["demo"])
    for partner in ("demo", "unknown", "d\x00emo"):
        own.child(own.calls, partner, "approved").inc()
        own.child(own.seconds, partner).observe(0.01)
    families = isofuzz.series_by_family(generate_latest(registry).decode())
    assert families["authsrv_external_calls"] == {
        (("partner", "demo"), ("result", "approved")), (("partner", "other"), ("result", "approved"))}
    assert families["authsrv_external_call_seconds"] == {(("partner", "demo"),), (("partner", "other"),)}


def test_external_metrics_once_per_registry():
    """A cluster node that becomes primary again in the same process builds a second Switch on the
    same registry: its external-balance metrics are the first ones, not a refused re-registration."""
    from authsrv.hotpath.external import ExternalMetrics
    from authsrv.metrics import Metrics

    metrics = Metrics()
    first = ExternalMetrics.of(metrics.registry, ["demo"])
    first.child(first.calls, "demo", "approved").inc()
    again = ExternalMetrics.of(metrics.registry, ["demo", "acme"])
    assert again is first
    again.child(again.calls, "acme", "approved").inc()
    from prometheus_client import generate_latest

    families = isofuzz.series_by_family(generate_latest(metrics.registry).decode())
    assert (("partner", "acme"), ("result", "approved")) in families["authsrv_external_calls"]
    assert ExternalMetrics.of(Metrics().registry, ["demo"]) is not first  # another registry: its own
