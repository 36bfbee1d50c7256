"""`make demo-cluster`: a failover with nothing lost, on loopback.

Three NATS servers (JetStream, `sync_interval: always`), a primary and a standby of one shard, and a
card network sending purchases at a steady rate to whichever node is the primary. In the middle the
primary is killed with SIGKILL. The summary shows the takeover time, what the network saw time out
meanwhile, that every approval it received is still approved on the new primary (each request is
sent again: a duplicate gets its original answer), `authsrv ledger verify` on the new primary, and
the killed node rejoining as a standby.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import iso8583
import iso8583.specs
import trio

from authsrv.cluster.devnats import NatsCluster, NodeProcess

SPEC = copy.deepcopy(iso8583.specs.default)
LEASE_S = 3
ANSWER_TIMEOUT_S = 2.0


def purchase(card: dict, number: int) -> dict:
    return {"t": "0100", "2": card["pan"], "3": "000000", "4": f"{1 + number % 50:012d}", "7": "1205120000",
            "11": f"{number % 1_000_000:06d}", "12": "120000", "13": "1205", "14": card["expiry"], "18": "5411",
            "22": "051", "32": "777777", "37": f"D{number:011d}", "41": "TERM0001", "42": "MERCHANT0000001",
            "43": "DEMO SHOP BERLIN                      DE", "48": f"9203{card['cvc2']}"[:7], "49": "978"}


def encode(doc: dict) -> bytes:
    raw, _ = iso8583.encode(dict(doc), SPEC)
    return struct.pack(">H", len(raw)) + bytes(raw)


async def call(port: int, doc: dict) -> dict | None:
    """One request on its own connection; None when nothing answered in time."""
    with trio.move_on_after(ANSWER_TIMEOUT_S):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return None
        async with stream:
            await stream.send_all(encode(doc))
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack(">H", data[:2])[0]:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                data += chunk
            return iso8583.decode(data[2:], SPEC)[0]
    return None


async def drive(nodes: list[NodeProcess], cards: list[dict], rate: int, duration_s: float, sent: dict, answers: dict,
                timeouts: list) -> None:
    """Open loop: request n is due at start + n / rate, sent to the node that is primary now."""
    started = trio.current_time()
    total = int(rate * duration_s)

    async def one(number: int) -> None:
        doc = purchase(cards[number % len(cards)], number)
        sent[doc["37"]] = doc
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None and node.primary():
                answer = await call(node.iso_port, doc)
                if answer is not None:
                    answers[doc["37"]] = answer
                    return
        timeouts.append(time.monotonic())

    async with trio.open_nursery() as nursery:
        for number in range(total):
            await trio.sleep_until(started + number / rate)
            nursery.start_soon(one, number)


async def settle(port: int, sent: dict) -> dict:
    final = {}
    for rrn, doc in sent.items():
        answer = await call(port, doc)
        final[rrn] = answer
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.cluster_demo")
    parser.add_argument("--rate", type=int, default=100, help="purchases per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (the kill is halfway)")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="authsrv-cluster-demo-"))
    cli = [sys.executable, "-m", "authsrv"]
    print(f"working directory {work}", flush=True)
    nats = NatsCluster.create(work / "nats", 3)
    nodes: list[NodeProcess] = []
    try:
        nats.start()
        print(f"NATS: 3 servers with JetStream, sync_interval always: {' '.join(nats.urls)}", flush=True)
        n1_dir, n2_dir = work / "n1", work / "n2"
        subprocess.run([*cli, "init", "--data", str(n1_dir)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*cli, "seed", "--data", str(n1_dir), "--users", str(args.users), "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
        urls = ", ".join(f'"{url}"' for url in nats.urls)
        with open(n1_dir / "authsrv.toml", "a") as config:
            config.write(f'\n[cluster]\nnats = [{urls}]\nshard = "demo"\nnode = "n1"\nreplicas = 3\nlease_s = {LEASE_S}\n')
        subprocess.run([*cli, "cluster", "join", "--data", str(n2_dir), "--from", str(n1_dir), "--node", "n2"],
                       check=True, stdout=subprocess.DEVNULL)
        cards = [json.loads(line) for line in (n1_dir / "cards.jsonl").read_text().splitlines()]
        nodes = [NodeProcess(n1_dir), NodeProcess(n2_dir)]
        n1, n2 = nodes
        n1.start().wait(n1.primary, 60, "primary")
        n2.start()
        print(f"n1 primary (ISO :{n1.iso_port}), n2 standby (ISO :{n2.iso_port}, refused until it takes over)",
              flush=True)
        sent: dict = {}
        answers: dict = {}
        timeouts: list = []
        takeover: list[float] = []

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drive, nodes, cards, args.rate, args.duration, sent, answers, timeouts)
                await trio.sleep(args.duration / 2)
                killed_at = time.monotonic()
                os.kill(n1.proc.pid, signal.SIGKILL)
                n1.proc.wait()
                print(f"kill -9 n1 (pid {n1.proc.pid}) after {args.duration / 2:.0f} s", flush=True)
                await trio.to_thread.run_sync(n2.wait, n2.primary, LEASE_S + 30, "takeover")
                takeover.append(time.monotonic() - killed_at)
                print(f"n2 is the primary {takeover[0]:.2f} s after the kill", flush=True)

        trio.run(run)
        approvals = {rrn: a for rrn, a in answers.items() if a.get("39") == "00"}
        final = trio.run(settle, n2.iso_port, {rrn: sent[rrn] for rrn in approvals})
        lost = [rrn for rrn, answer in approvals.items()
                if final[rrn] is None or final[rrn].get("39") != "00" or final[rrn].get("38") != answer.get("38")]
        verify = subprocess.run([*cli, "ledger", "verify", "--data", str(n2_dir)], capture_output=True, text=True)
        report = json.loads(verify.stdout) if verify.stdout.startswith("{") else {"ok": False}
        started = time.monotonic()
        n1.start()  # the killed node comes back: a standby that catches up
        rejoined = time.monotonic() - started
        n1_role = "primary" if n1.primary() else "standby"
        codes: dict[str, int] = {}
        for answer in answers.values():
            codes[answer.get("39", "?")] = codes.get(answer.get("39", "?"), 0) + 1
        ok = not lost and report.get("ok") and takeover and takeover[0] <= LEASE_S + 2 and n1_role == "standby"
        print("\n== cluster demo summary ==")
        print(f"requests sent {len(sent)}, answered {len(answers)} ({', '.join(f'{c}:{n}' for c, n in sorted(codes.items()))})")
        print(f"takeover: {takeover[0]:.2f} s after kill -9 (lease {LEASE_S} s; bound {LEASE_S + 2} s)")
        print(f"requests the network saw time out during the takeover: {len(timeouts)}")
        print(f"approvals received {len(approvals)}, lost on the new primary: {len(lost)}")
        print(f"ledger verify on n2: {'passed' if report.get('ok') else 'FAILED'} (seq {report.get('last_seq')}, "
              f"{report.get('pending_holds')} pending holds)")
        print(f"n1 restarted: {n1_role} after {rejoined:.1f} s")
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        for node in nodes:
            node.stop()
        nats.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
