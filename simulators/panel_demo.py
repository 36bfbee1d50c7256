"""`make panel`: the Administration Panel on a server with demo data and a gentle stream of traffic.

Steps: a fresh data directory (`./.panel-demo` unless `--data`), `authsrv init`, the partner
simulator for an external-balance partner (`ext`, as in `make demo`, so the dashboard's partner
latency moves), both partners seeded, `authsrv serve` on loopback, a few customers with KYC forms
waiting for review (document images included) sent through the partner channel, then the network
simulator's mixed ISO 8583 traffic at a few authorizations per second, in rounds of ROUND_S, on
loopback, until Ctrl-C (SIGINT) or SIGTERM. It prints the panel's URL, the admin username and
password and the development CA to trust, then the traffic's progress; on Ctrl-C it stops the load,
the server (SIGTERM: it drains and snapshots) and the simulator, and exits 0.

    python -m simulators.panel_demo [--data ./.panel-demo] [--rate 3] [--users 200] [--rest-port 8443]
"""

from __future__ import annotations

import argparse
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

import httpx
import trio

from simulators.demo import EXTERNAL_PARTNER, INTERNAL_PARTNER, PARTNER_SIM_ARGS, _prepare_data, fresh_data_dir
from simulators.network.load import LoadConfig, LoadError, run_load
from simulators.network.pinblock import load_zpk
from simulators.network.target import (
    ChildProcess,
    Ports,
    TargetError,
    authsrv_command,
    free_port,
    run_cli,
    start_authsrv,
)

DEFAULT_DATA = Path(".panel-demo")
RATE_PER_S_MAX = 50.0  # "gentle": the panel is the point, not the switch's throughput
ROUND_S = 60.0  # one network-simulator run; the next starts with another seed (fresh RRNs, cards)
EXTERNAL_SHARE = 0.2
KYC_CUSTOMERS = (  # waiting for review, with their document images
    ("Maria", "Kowalska", "48601100201", "2099-05-31"),
    ("Jan", "Nowak", "48601100202", "2098-01-15"),
    ("Ewa", "Wisniewska", "48601100203", "2097-09-30"),
)
DOCUMENT_SIZE = (240, 150)  # pixels of the generated document photos
PREFERRED_REST_PORT = 8443


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators.panel_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="data directory, removed and recreated on each run (default ./.panel-demo)")
    parser.add_argument("--rate", type=float, default=3.0, help="authorizations per second (default 3)")
    parser.add_argument("--users", type=int, default=200, help="seeded users over both partners (default 200)")
    parser.add_argument("--rest-port", type=int, default=PREFERRED_REST_PORT,
                        help="the panel's HTTPS port (default 8443; a free one if it is taken)")
    return parser


# -- document photos without an imaging library ----------------------------------------------------


def png(width: int, height: int, pixel) -> bytes:
    """An RGB PNG (no filtering) whose pixel (x, y) is `pixel(x, y) -> (r, g, b)`."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(channel for x in range(width) for channel in pixel(x, y)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def document_photo(seed: int, side: str) -> bytes:
    """A made-up identity document: a coloured card with a photo box and text lines."""
    width, height = DOCUMENT_SIZE
    tint = ((60 + 50 * seed) % 200, 110, (180 - 40 * seed) % 220)

    def pixel(x: int, y: int) -> tuple[int, int, int]:
        if x < 4 or y < 4 or x >= width - 4 or y >= height - 4:
            return (40, 40, 60)  # border
        if side == "front" and 14 <= x < 84 and 22 <= y < 122:
            return (200, 180, 160) if (x - 49) ** 2 + (y - 60) ** 2 < 500 or y > 95 else (120, 130, 150)
        lines = range(30, 120, 18) if side == "front" else range(20, 140, 12)
        start = 96 if side == "front" else 16
        if any(line <= y < line + 6 for line in lines) and start <= x < width - 20:
            return (30, 30, 30)
        return (235 - tint[0] // 4, 238 - tint[1] // 5, 242 - tint[2] // 6)

    return png(width, height, pixel)


def face_photo(seed: int) -> bytes:
    def pixel(x: int, y: int) -> tuple[int, int, int]:
        inside = (x - 60) ** 2 + (y - 60) ** 2 < 1400
        return (210, 170 + 10 * seed % 40, 140) if inside else (90, 120, 170)

    return png(120, 140, pixel)


# -- customers waiting for KYC review --------------------------------------------------------------


def kyc_form(first: str, last: str, expires: str) -> dict[str, str]:
    return {"firstName": first, "lastName": last, "street": "Krakowskie Przedmiescie", "number": "5",
            "apartment": "3", "city": "Warszawa", "postCode": "00-068", "country": "PL", "nationality": "polish",
            "birthDate": "1988-04-12", "documentType": "id_card", "identityCardNo": "ABC123456",
            "documentExpirationDate": expires}  # fmt: skip


def submit_kyc_forms(data: Path, rest_port: int) -> int:
    """New customers of partner `demo`, each with a KYC form and three images, through the partner
    channel (mutual TLS with the partner's certificate): the panel's KYC queue has work."""
    from authsrv.pki import client_ssl_context

    context = client_ssl_context(data / "pki", "partner")
    sent = 0
    with httpx.Client(base_url=f"https://127.0.0.1:{rest_port}", verify=context, timeout=20) as client:
        for index, (first, last, phone, expires) in enumerate(KYC_CUSTOMERS):
            created = client.post("/lifecycle/v1/wallet", json={
                "firstName": first, "lastName": last, "phone": phone, "email": f"{first.lower()}@example.com",
                "birthDate": "1988-04-12", "wPIN": "2468", "state": "VERIFIED", "kyc": "PENDING"})
            if created.status_code != 201:
                raise TargetError(f"creating a KYC customer answered {created.status_code}: {created.text[:200]}")
            customer_id = created.json()["customerId"]
            images = {"imageFront": ("front.png", document_photo(index, "front"), "image/png"),
                      "imageBack": ("back.png", document_photo(index, "back"), "image/png"),
                      "imageFace": ("face.png", face_photo(index), "image/png")}
            form = client.post(f"/secure/customers/{customer_id}/register", data=kyc_form(first, last, expires),
                               files=images)
            if form.status_code != 201:
                raise TargetError(f"a KYC form answered {form.status_code}: {form.text[:200]}")
            sent += 1
    return sent


# -- traffic until Ctrl-C --------------------------------------------------------------------------


async def drive_until_stopped(cards: dict[str, Path], iso_port: int, zpk: bytes, rate: float) -> None:
    """`drive` until SIGTERM (Ctrl-C, SIGINT, is trio's KeyboardInterrupt, raised out of trio.run)."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive, cards, iso_port, zpk, rate)
            async for _ in signals:
                print("\nSIGTERM: stopping ...", flush=True)
                nursery.cancel_scope.cancel()
                return


async def one_round(cards: dict[str, Path], iso_port: int, zpk: bytes, rate: float, number: int) -> dict[str, int]:
    """ROUND_S of the mix at both partners' cards at once; the answers by field 39."""
    rates = {INTERNAL_PARTNER: rate * (1 - EXTERNAL_SHARE), EXTERNAL_PARTNER: rate * EXTERNAL_SHARE}
    codes: dict[str, int] = {}

    async def one(partner: str, seed: int) -> None:
        config = LoadConfig(cards_path=cards[partner], port=iso_port, rate_per_s=rates[partner], duration_s=ROUND_S,
                            connections=1, seed=seed, zpk=zpk, pin_victims_reused=number > 1)  # fmt: skip
        report = await run_load(config)
        for code, count in report.codes.items():
            codes[code] = codes.get(code, 0) + count

    async with trio.open_nursery() as nursery:
        for index, partner in enumerate(cards):
            nursery.start_soon(one, partner, number * 10 + index)  # another seed each round: fresh RRNs
    return codes


async def drive(cards: dict[str, Path], iso_port: int, zpk: bytes, rate: float) -> None:
    """Rounds of the network simulator's mix at `rate`/s until cancelled."""
    total = 0
    for number in range(1, sys.maxsize):  # until Ctrl-C
        codes = await one_round(cards, iso_port, zpk, rate, number)
        answered = sum(codes.values())
        total += answered
        mix = ", ".join(f"{code} x{count}" for code, count in sorted(codes.items(), key=lambda item: -item[1]))
        print(f"  {time.strftime('%H:%M:%S')}  round {number}: {answered} answered ({mix}); {total} in all",
              flush=True)


def _rest_port(preferred: int) -> int:
    import socket

    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    return free_port()


def _banner(data: Path, rest_port: int) -> str:
    password = (data / "admin-password").read_text().strip()
    ca = (data / "pki" / "ca.crt").resolve()
    return "\n".join([
        "",
        "=" * 78,
        f"  Administration panel:  https://127.0.0.1:{rest_port}/panel/",
        "  username:              admin",
        f"  password:              {password}   (also in {(data / 'admin-password').resolve()})",
        f"  development CA:        {ca}",
        "  The server's certificate comes from this development CA: the browser warns about it",
        "  unless you import the CA above as trusted (or accept the warning for 127.0.0.1).",
        "  Traffic: the network simulator's mix on loopback, a few authorizations per second.",
        "  Press Ctrl-C to stop.",
        "=" * 78,
        "",
    ])


def run_panel_demo(args: argparse.Namespace) -> int:
    data = args.data.resolve()
    fresh_data_dir(data)
    data.parent.mkdir(parents=True, exist_ok=True)
    log_path = data.parent / f"{data.name}.log"
    log_path.unlink(missing_ok=True)
    print(f"data directory: {data} (removed and recreated on each run); server output: {log_path}", flush=True)
    run_cli(authsrv_command("init", "--data", str(data)), log_path=log_path)
    sim_url = f"http://127.0.0.1:{free_port()}"
    sim: ChildProcess | None = None
    server: ChildProcess | None = None
    try:
        from bench.external import start_partner_sim

        sim = start_partner_sim(int(sim_url.rsplit(":", 1)[1]), data / "partner-sim.log", PARTNER_SIM_ARGS)
        print(f"seeding {args.users} users with 2 cards each ...", flush=True)
        cards = _prepare_data(data, argparse.Namespace(users=args.users, cards_per_user=2), sim_url, log_path)
        free = Ports.free()
        ports = Ports(free.iso, _rest_port(args.rest_port), free.metrics)
        server = start_authsrv(data, ports, log_path)
        waiting = submit_kyc_forms(data, ports.rest)
        print(f"{waiting} KYC forms waiting for review (with document images)", flush=True)
        print(_banner(data, ports.rest), flush=True)
        try:
            trio.run(drive_until_stopped, cards, ports.iso, load_zpk(data / "keys" / "zpk.hex"), args.rate)
        except (KeyboardInterrupt, BaseExceptionGroup) as error:
            # trio raises the Ctrl-C bare or inside the group of the nursery it cancelled.
            if isinstance(error, BaseExceptionGroup):
                _, others = error.split(KeyboardInterrupt)
                if others is not None:
                    raise others from None
            print("\nCtrl-C: stopping the traffic, the server and the partner simulator ...", flush=True)
        exit_code = server.stop()
        server = None
        print(f"server stopped (exit {exit_code}); the data stays in {data}", flush=True)
        return 0 if exit_code == 0 else 1
    finally:
        # Ctrl-C again while stopping lands here too: nothing is left running.
        if server is not None:
            server.stop()
        if sim is not None:
            sim.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.rate <= RATE_PER_S_MAX:
        print(f"error: --rate must be in (0, {RATE_PER_S_MAX:g}]", file=sys.stderr)
        return 2
    if args.users < 2:
        print("error: --users must be at least 2 (both partners get users)", file=sys.stderr)
        return 2
    # Ctrl-C must stop the demo even when it was started with SIGINT ignored (`&` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_panel_demo(args)
    except (TargetError, LoadError, ValueError, OSError, httpx.HTTPError) as error:
        print(f"panel demo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted while starting; stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
