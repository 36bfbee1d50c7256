"""HTTPS listener for the REST app: anycorn on trio, server TLS, partner client certificates requested."""

from __future__ import annotations

import logging
import ssl
from functools import partial
from pathlib import Path

import anycorn
import trio
from anycorn.config import Config

log = logging.getLogger("authsrv.rest")

SHUTDOWN_GRACE_S = 3.0
KEEP_ALIVE_TIMEOUT_S = 5.0
TLS_HANDSHAKE_TIMEOUT_S = 5.0
HEADER_BYTES_MAX = 16 * 1024


def rest_config(*, host: str, port: int, pki_dir: Path) -> Config:
    pki_dir = Path(pki_dir)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.certfile = str(pki_dir / "server.crt")
    config.keyfile = str(pki_dir / "server.key")
    config.ca_certs = str(pki_dir / "ca.crt")
    # Requested, not required: /openapi.json (and later the customer and admin channels) are
    # reached without one; the app refuses /lifecycle and /secure without a verified certificate.
    config.verify_mode = ssl.CERT_OPTIONAL
    config.alpn_protocols = ["http/1.1"]
    config.graceful_timeout = SHUTDOWN_GRACE_S
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT_S
    config.h11_max_incomplete_size = HEADER_BYTES_MAX
    config.accesslog = None
    return config


async def serve_rest(app, *, host: str, port: int, pki_dir: Path, shutdown: trio.Event,
                     stopped: trio.Event | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until `shutdown` is set; `stopped` (optional) is set once anycorn has returned.

    Stop it with `shutdown`, then wait for `stopped` before cancelling the enclosing scope:
    cancelling anycorn mid-shutdown makes its lifespan fail. task_status.started(port) gives the
    bound port (port 0 picks a free one)."""
    config = rest_config(host=host, port=port, pki_dir=pki_dir)
    try:
        async with trio.open_nursery() as nursery:
            serve = partial(anycorn.serve, app, config, shutdown_trigger=shutdown.wait)
            binds = await nursery.start(serve)
            assert len(binds) == 1, binds
            bound_port = int(binds[0].rsplit(":", 1)[1])
            assert 0 < bound_port < 65536
            log.info("REST (HTTPS, partner mTLS) on %s", binds[0])
            task_status.started(bound_port)
    finally:
        if stopped is not None:
            stopped.set()
