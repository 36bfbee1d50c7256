"""Serving the partner simulator: settings, the in-process handle, anycorn on trio (TLS optional)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anycorn
import attrs
import trio
from anycorn.config import Config

from simulators.partner.app import SimOptions, build_partner_app
from simulators.partner.jwe import SimKey
from simulators.partner.state import (
    IDEMPOTENCY_KEYS_MAX,
    RECEIVED_MAX,
    Latency,
    Mode,
    PartnerState,
)
from simulators.partner.wire import AMOUNT_MINOR_MAX, DEBIT_DECLINES, Title

log = logging.getLogger("simulators.partner")

HOST = "127.0.0.1"  # loopback only: the simulator has no authentication of its own without TLS
SHUTDOWN_GRACE_S = 1.0
KEEP_ALIVE_TIMEOUT_S = 30.0  # longer than a client pool's idle time, so pooled connections stay up
KEEP_ALIVE_REQUESTS_MAX = 1_000_000  # anycorn closes a connection after 1,000 by default: a pool would churn
TLS_HANDSHAKE_TIMEOUT_S = 5.0
HEADER_BYTES_MAX = 16 * 1024


def _rate(instance, attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be 0..1, not {value}")


@attrs.frozen(kw_only=True)
class PartnerSimSettings:
    """Everything fixed at start. The fault knobs are the initial `Mode`; `/_sim/mode` changes them."""

    port: int = attrs.field(default=0, validator=attrs.validators.and_(attrs.validators.ge(0),
                                                                        attrs.validators.lt(65536)))
    latency: Latency = Latency()
    fail_5xx: float = attrs.field(default=0.0, validator=_rate)
    timeout_rate: float = attrs.field(default=0.0, validator=_rate)
    timeout_ms: float = attrs.field(default=5_000.0, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.le(60_000.0)))
    drop_rate: float = attrs.field(default=0.0, validator=_rate)
    amount_codes: bool = True
    forced_users: dict[str, Title] = attrs.field(factory=dict)
    initial_amount_minor: int = attrs.field(default=0, validator=attrs.validators.and_(
        attrs.validators.ge(-AMOUNT_MINOR_MAX), attrs.validators.le(AMOUNT_MINOR_MAX)))
    currency: str = "EUR"  # of balances made by the control API without a currency
    seed: int | None = None  # of the latency and fault draws: the same seed, the same sequence
    jwe_key: SimKey | None = None  # generated at start when None and jwe_key_path is None
    jwe_key_path: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # with TLS: client certificates required, signed by this CA
    idempotency_key_required: bool = True
    otp_encryption_required: bool = True
    idempotency_keys_max: int = IDEMPOTENCY_KEYS_MAX
    received_max: int = RECEIVED_MAX

    def __attrs_post_init__(self) -> None:
        if self.fail_5xx + self.timeout_rate + self.drop_rate > 1.0:
            raise ValueError("fail_5xx + timeout_rate + drop_rate must be at most 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca needs tls_cert and tls_key")
        if any(code not in DEBIT_DECLINES for code in self.forced_users.values()):
            raise ValueError(f"forced user codes must be one of {', '.join(DEBIT_DECLINES)}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def initial_mode(self) -> Mode:
        return Mode(latency=self.latency, fail_5xx=self.fail_5xx, timeout_rate=self.timeout_rate,
                    timeout_ms=self.timeout_ms, drop_rate=self.drop_rate, amount_codes=self.amount_codes,
                    forced_users=dict(self.forced_users))

    def load_key(self) -> SimKey:
        if self.jwe_key is not None:
            return self.jwe_key
        if self.jwe_key_path is not None:
            return SimKey.load(self.jwe_key_path)
        return SimKey.generate()


@attrs.define
class PartnerSim:
    """The running simulator, as `serve_partner` hands it to `task_status.started`."""

    port: int
    state: PartnerState
    key: SimKey
    tls: bool
    shutdown: trio.Event
    stopped: trio.Event  # set once anycorn has returned

    @property
    def url(self) -> str:
        """Base URL, the `api_url` of a `[partners.NAME]` table."""
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    def stop(self) -> None:
        """Ask the server to stop; `serve_partner` returns once anycorn has shut down."""
        self.shutdown.set()


def _config(settings: PartnerSimSettings) -> Config:
    config = Config()
    config.bind = [f"{HOST}:{settings.port}"]
    config.accesslog = None
    config.graceful_timeout = SHUTDOWN_GRACE_S
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.keep_alive_max_requests = KEEP_ALIVE_REQUESTS_MAX
    config.h11_max_incomplete_size = HEADER_BYTES_MAX
    if settings.tls:
        config.certfile = str(settings.tls_cert)
        config.keyfile = str(settings.tls_key)
        config.alpn_protocols = ["http/1.1"]
        config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT_S
        if settings.client_ca is not None:
            # The documents' Security section: the caller authenticates with its certificate,
            # "which should be checked on the client side".
            config.ca_certs = str(settings.client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
    return config


async def serve_partner(settings: PartnerSimSettings, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve on 127.0.0.1 until `PartnerSim.stop()` or cancellation; task_status.started(PartnerSim).

    Cancellation becomes a graceful shutdown (bounded by SHUTDOWN_GRACE_S + 2 s): cancelling anycorn
    itself makes its lifespan fail, so anycorn runs in a shielded scope that only this task closes."""
    key = settings.load_key()
    state = PartnerState(
        mode=settings.initial_mode(), initial_amount_minor=settings.initial_amount_minor,
        currency=settings.currency, seed=settings.seed,
        idempotency_keys_max=settings.idempotency_keys_max, received_max=settings.received_max,
    )
    options = SimOptions(idempotency_key_required=settings.idempotency_key_required,
                         otp_encryption_required=settings.otp_encryption_required)
    serve = partial(anycorn.serve, build_partner_app(state, key, options), _config(settings))
    shutdown, stopped = trio.Event(), trio.Event()
    server_scope = trio.CancelScope(shield=True)

    async def run_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with server_scope:
                async with trio.open_nursery() as nursery:
                    binds = await nursery.start(partial(serve, shutdown_trigger=shutdown.wait))
                    assert len(binds) == 1, binds
                    log.info("partner simulator on %s (%s)", binds[0], "TLS" if settings.tls else "plain HTTP")
                    task_status.started(int(binds[0].rsplit(":", 1)[1]))
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_server)
        assert 0 < port < 65536
        task_status.started(PartnerSim(port=port, state=state, key=key, tls=settings.tls,
                                       shutdown=shutdown, stopped=stopped))
        try:
            await shutdown.wait()
        finally:
            shutdown.set()
            with trio.move_on_after(SHUTDOWN_GRACE_S + 2.0) as grace:
                grace.shield = True
                await stopped.wait()
            if not stopped.is_set():
                server_scope.cancel()  # anycorn did not stop in time: cut it off


@asynccontextmanager
async def running_partner(settings: PartnerSimSettings) -> AsyncIterator[PartnerSim]:
    """`async with running_partner(settings) as sim:` ... stopped gracefully on exit, also when the
    body raises or is cancelled."""
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(serve_partner, settings)
        try:
            yield sim
        finally:
            sim.stop()
