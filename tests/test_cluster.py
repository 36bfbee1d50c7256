"""Cluster mode on a real 3-server NATS cluster (nats-server from the venv, `sync_interval: always`):
kill -9 of the primary under load loses no approval; a card locked through REST right before the
failover stays locked; a paused primary commits nothing after the takeover and steps down; a standby
that joins late catches up from a snapshot; the node that died rejoins as a standby."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio

from authsrv.cluster.devnats import NatsCluster, NodeProcess
from tests.conftest import SEED_AMOUNT, run_cli
from tests.isoclient import IsoClient, auth
from tests.restclient import https
from tests.test_switch_process import _load, _settle as settle, _verify as verify

LEASE_S = 2


@pytest.fixture(scope="module")
def nats(tmp_path_factory):
    cluster = NatsCluster.create(tmp_path_factory.mktemp("nats"), 3)
    with cluster:
        yield cluster


Node = NodeProcess


def cluster_table(nats: NatsCluster, shard: str, node: str, **extra) -> str:
    urls = ", ".join(f'"{url}"' for url in nats.urls)
    lines = [f"nats = [{urls}]", f'shard = "{shard}"', f'node = "{node}"', "replicas = 3", f"lease_s = {LEASE_S}"]
    return "\n[cluster]\n" + "\n".join(lines) + "\n" + "".join(f"{k} = {v}\n" for k, v in extra.items())


@pytest.fixture
def shard(nats, data_dir, tmp_path, request):
    """n1 = the seeded data directory with [cluster]; n2 joined from it. Both stopped at the end."""
    name = request.node.name.replace("test_", "")[:24].replace("[", "_").replace("]", "")
    config = data_dir / "authsrv.toml"
    config.write_text(config.read_text() + cluster_table(nats, name, "n1"))
    joined = run_cli("cluster", "join", "--data", str(tmp_path / "n2"), "--from", str(data_dir), "--node", "n2")
    assert joined.returncode == 0, joined.stderr
    nodes = [Node(data_dir), Node(tmp_path / "n2")]
    yield nodes
    for node in nodes:
        node.stop()


async def caught_up(standby: Node, primary: Node) -> None:
    await trio.sleep(LEASE_S / 3 + 0.2)  # the primary's figure moves with its lease renewals
    target = primary.metric("authsrv_cluster_applied_seq")
    await trio.to_thread.run_sync(standby.wait, lambda: standby.metric("authsrv_cluster_applied_seq") >= target,
                                  30, f"catch-up to {target}")
    assert standby.metric("authsrv_cluster_replication_lag_records") is not None


def assert_answers_stand(answers: dict, final: dict) -> None:
    """Every approval a client received is held by the new primary, with its authorization code.
    (A decline waits for no commit: one from a node that was deposed may be decided again.)"""
    approvals = 0
    for rrn, answer in answers.items():
        if answer["39"] == "00":
            approvals += 1
            assert final[rrn]["39"] == "00" and final[rrn]["38"] == answer["38"], (rrn, final[rrn])
    assert approvals > 0


def assert_books(data_dir: Path, cards: list[dict], sent: dict, final: dict) -> None:
    """User balances equal the seeded amount less every approval (nothing lost, nothing twice)."""
    spent: dict[int, int] = {}
    by_pan = {card["pan"]: card for card in cards}
    for rrn, response in final.items():
        if response["39"] == "00":
            balance = by_pan[sent[rrn]["2"]]["balanceId"]
            spent[balance] = spent.get(balance, 0) + int(sent[rrn]["4"])
    report = verify(data_dir)
    user = report["totals"]["EUR"]["user_balance"]
    balances = {card["balanceId"] for card in cards}
    expected_available = len(balances) * SEED_AMOUNT - sum(spent.values())
    assert user["credits_posted"] - user["debits_posted"] - user["debits_pending"] == expected_available


async def test_kill_9_of_the_primary_under_load_loses_no_approval(shard, cards):
    n1, n2 = shard
    n1.start().wait(n1.primary, 30, "primary")
    n2.start()
    assert not n2.primary() and n2.status("/healthz") == 200
    sent: dict = {}
    answers: dict = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_load, n1.iso_port, cards, sent, answers, 400, 4)
        await trio.sleep(0.6)
        n1.kill()
    takeover_s = await trio.to_thread.run_sync(n2.wait, n2.primary, LEASE_S + 10, "takeover")
    assert takeover_s <= LEASE_S + 2, takeover_s
    assert sum(1 for answer in answers.values() if answer["39"] == "00") > 0
    final = await settle(n2.iso_port, sent)
    assert_answers_stand(answers, final)
    assert_books(n2.data_dir, cards, sent, final)
    assert n2.metric("authsrv_cluster_primary") == 1 and n2.metric("authsrv_cluster_takeovers_total") == 1

    n1.start()  # the dead node comes back as a standby and catches up
    await caught_up(n1, n2)
    assert not n1.primary() and n1.metric("authsrv_cluster_primary") == 0
    async with https(n1.data_dir, n1.rest_port) as anonymous:
        reply = await anonymous.get("/openapi.json")
    assert reply.status_code == 503 and reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["title"] == "NOT_PRIMARY"


async def test_a_card_locked_before_the_failover_stays_locked(shard, cards):
    n1, n2 = shard
    n1.start().wait(n1.primary, 30, "primary")
    n2.start()
    card = cards[0]
    client = await IsoClient.connect(n1.iso_port)
    assert (await client.call(auth(card, amount=100)))["39"] == "00"
    await client.aclose()
    async with https(n1.data_dir, n1.rest_port, "partner") as partner:
        reply = await partner.post(f"/secure/customers/{card['customerId']}/cards/{card['cardId']}/lock",
                                   json={"reason": 2})
    assert reply.status_code == 200, reply.text
    n1.kill()  # right after the 200: the lock was acknowledged by the stream before it
    await trio.to_thread.run_sync(n2.wait, n2.primary, LEASE_S + 10, "takeover")
    client = await IsoClient.connect(n2.iso_port)
    declined = await client.call(auth(card, amount=100))
    assert declined["39"] == "43", declined  # reason 2: stolen
    assert (await client.call(auth(cards[2], amount=100)))["39"] == "00"
    await client.aclose()


async def test_a_paused_primary_commits_nothing_after_the_takeover(shard, cards):
    n1, n2 = shard
    n1.start().wait(n1.primary, 30, "primary")
    n2.start()
    sent: dict = {}
    answers: dict = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_load, n1.iso_port, cards, sent, answers, 300, 2)
        await trio.sleep(0.4)
        n1.proc.send_signal(signal.SIGSTOP)
        await trio.to_thread.run_sync(n2.wait, n2.primary, LEASE_S + 10, "takeover")
        n1.proc.send_signal(signal.SIGCONT)  # it wakes up believing it is the primary
        stepped_down = await trio.to_thread.run_sync(n1.wait, lambda: not n1.primary(), LEASE_S + 5, "step-down")
        assert stepped_down <= LEASE_S + 2
        nursery.cancel_scope.deadline = trio.current_time() + 10
    final = await settle(n2.iso_port, sent)
    assert_answers_stand(answers, final)  # every approval n1 sent, before or after the pause, is on n2
    assert_books(n2.data_dir, cards, sent, final)
    await trio.to_thread.run_sync(n1.wait, lambda: n1.metric("authsrv_cluster_primary") == 0, 10, "standby")


async def test_a_late_standby_catches_up_from_a_snapshot(shard, cards, tmp_path):
    n1, n2 = shard
    config = n1.data_dir / "authsrv.toml"
    config.write_text(config.read_text().replace("snapshot_interval_records = 500000", "snapshot_interval_records = 200"))
    n1.start().wait(n1.primary, 30, "primary")
    sent: dict = {}
    answers: dict = {}
    await _load(n1.iso_port, cards, sent, answers, 150, 4)
    await trio.to_thread.run_sync(n1.wait, lambda: (n1.metric("authsrv_cluster_snapshots_total") or 0) >= 1, 20,
                                  "a snapshot")
    n2.start()  # joined from the start, but first started now: the stream before the snapshot is gone
    await caught_up(n2, n1)
    assert "restored the snapshot at seq" in n2.log()
    restored = [line for line in n2.log().splitlines() if "restored the snapshot at seq" in line][-1]
    assert "at seq 0 " not in restored
    n1.kill()
    await trio.to_thread.run_sync(n2.wait, n2.primary, LEASE_S + 10, "takeover")
    final = await settle(n2.iso_port, sent)
    assert_answers_stand(answers, final)
    assert_books(n2.data_dir, cards, sent, final)


async def resumed(node: Node, purchase, card: dict, timeout_s: float) -> None:
    deadline = trio.current_time() + timeout_s
    while True:
        try:
            if node.primary() and (await purchase(card))["39"] == "00":
                return
        except (OSError, EOFError, trio.TooSlowError):
            pass
        assert trio.current_time() < deadline, node.log()[-3000:]
        await trio.sleep(0.25)


async def test_nats_servers_down_and_back(data_dir, cards, tmp_path):
    """One NATS server down: approvals go on. Every server down: the primary answers 91 and loses
    nothing acknowledged. Servers back: approvals resume, on their own."""
    own = NatsCluster.create(tmp_path / "nats", 3)
    with own:
        config = data_dir / "authsrv.toml"
        config.write_text(config.read_text() + cluster_table(own, "outage", "n1"))
        node = Node(data_dir)
        try:
            node.start().wait(node.primary, 30, "primary")
            answers: dict = {}
            sent: dict = {}

            async def purchase(card: dict, timeout: float = 10) -> dict:
                request = auth(card, amount=7)
                sent[request["37"]] = request
                client = await IsoClient.connect(node.iso_port)
                try:
                    answer = await client.call(request, timeout=timeout)
                finally:
                    await client.aclose()
                answers[request["37"]] = answer
                return answer

            assert (await purchase(cards[0]))["39"] == "00"
            own.servers[0].kill()  # maybe the stream's leader or this node's server: a few seconds
            await resumed(node, purchase, cards[3], 20)  # of re-election and reconnection at most
            codes = [(await purchase(cards[i % len(cards)]))["39"] for i in range(10)]
            assert codes == ["00"] * 10, codes  # R3 carries on with two servers
            for server in own.servers[1:]:
                server.kill()
            assert (await purchase(cards[1]))["39"] == "91"  # nothing can commit: stand-in
            async with https(data_dir, node.rest_port, "partner") as partner:
                card = cards[4]
                reply = await partner.post(f"/secure/customers/{card['customerId']}/cards/{card['cardId']}/lock",
                                           json={"reason": 5})
            assert reply.status_code == 503 and reply.json()["title"] == "REPLICATION_UNAVAILABLE", reply.text
            for server in own.servers:
                server.start()
            await resumed(node, purchase, cards[2], 40)
            final = await settle(node.iso_port, sent)
            assert_answers_stand(answers, final)
            assert_books(data_dir, cards, sent, final)
        finally:
            node.stop()


async def test_offline_commands_write_through_the_stream(nats, data_dir, tmp_path):
    """`seed` and `partner add` on a node with [cluster] go through the shard's stream: a standby
    made later with `cluster join` has their effects; while a primary runs they are refused."""
    config = data_dir / "authsrv.toml"
    config.write_text(config.read_text() + cluster_table(nats, "offline", "n1"))
    before = len((data_dir / "cards.jsonl").read_text().splitlines())
    seeded = run_cli("seed", "--data", str(data_dir), "--users", "3", "--quiet")
    assert seeded.returncode == 0, seeded.stderr
    new_cards = [json.loads(line) for line in (data_dir / "cards.jsonl").read_text().splitlines()[before:]]
    assert len(new_cards) == 3
    assert run_cli("cluster", "join", "--data", str(tmp_path / "n2"), "--from", str(data_dir),
                   "--node", "n2").returncode == 0
    n2 = Node(tmp_path / "n2")
    try:
        n2.start().wait(n2.primary, 30, "primary")  # n1 never served: n2 has the seed from the stream
        client = await IsoClient.connect(n2.iso_port)
        assert (await client.call(auth(new_cards[0], amount=10)))["39"] == "00"
        await client.aclose()
        refused = run_cli("seed", "--data", str(data_dir), "--users", "1", "--quiet")
        assert refused.returncode == 2 and "n2 is the primary" in refused.stderr, refused.stderr
    finally:
        n2.stop()
    added = run_cli("partner", "add", "--data", str(data_dir), "acme")  # n2 stopped: its lease was given back
    assert added.returncode == 0, added.stderr
    n2.start().wait(n2.primary, 30, "primary")
    try:
        client = await IsoClient.connect(n2.iso_port)
        assert (await client.call(auth(new_cards[1], amount=10)))["39"] == "00"
        await client.aclose()
    finally:
        n2.stop()
    from authsrv.store.db import Store

    with Store.open(tmp_path / "n2") as store:  # n2's own copy, restored and followed
        assert store.get_partner("acme") is not None
    report = verify(tmp_path / "n2")
    assert report["ok"], report


REPLICATED_TABLES = ("partners", "programs", "users", "balances", "cards", "admins", "spend_controls", "events",
                     "kyc_forms", "ledger_accounts", "partner_balances", "devices")


def store_rows(data_dir: Path) -> dict[str, list]:
    import sqlite3

    connection = sqlite3.connect(f"file:{data_dir / 'store.db'}?mode=ro", uri=True)
    try:
        return {table: connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in REPLICATED_TABLES}
    finally:
        connection.close()


async def test_a_standby_store_equals_the_primary_store(shard, cards):
    """Management changes through REST (a lock, spend controls, a new user, an admin user, FX
    rates) reach the standby's SQLite and files, row for row, before the callers are answered."""
    from tests.restclient import admin_login, bearer, new_user_body

    n1, n2 = shard
    n1.start().wait(n1.primary, 30, "primary")
    n2.start()
    card = cards[0]
    password = (n1.data_dir / "admin-password").read_text().strip()
    rates = {"base": "EUR", "rates": {"USD": "1.0842"}, "asOf": "2025-01-02T16:00:00Z"}
    async with https(n1.data_dir, n1.rest_port, "partner") as partner, https(n1.data_dir, n1.rest_port) as anonymous:
        root = f"/secure/customers/{card['customerId']}/cards/{card['cardId']}"
        assert (await partner.post(f"{root}/lock", json={"reason": 3})).status_code == 200
        limits = await partner.put(f"/secure/customers/{cards[2]['customerId']}/cards/{cards[2]['cardId']}/limits",
                                   json={"channels": {"ecommerce": False}})
        assert limits.status_code == 200, limits.text
        assert (await partner.post("/lifecycle/v1/wallet", json=new_user_body())).status_code in (200, 201)
        token = await admin_login(anonymous, "admin", password)
        reply = await anonymous.post("/admin/users", headers=bearer(token),
                                     json={"username": "clerk", "password": "a long enough secret 1", "role": "Employee"})
        assert reply.status_code in (200, 201), reply.text
        assert (await anonymous.put("/admin/fx-rates", headers=bearer(token), json=rates)).status_code == 200
    await caught_up(n2, n1)
    primary, standby = store_rows(n1.data_dir), store_rows(n2.data_dir)
    for table in REPLICATED_TABLES:
        assert standby[table] == primary[table], table
    assert any(row for row in primary["admins"] if row[0] == "clerk") and primary["spend_controls"]
    assert (n2.data_dir / "fx-rates.json").read_bytes() == (n1.data_dir / "fx-rates.json").read_bytes()


def tried_by(data_dir: Path) -> set[str]:
    """Keys of the partner calls a node's own store says it tried (read from its file)."""
    import sqlite3

    connection = sqlite3.connect(f"file:{data_dir / 'store.db'}?mode=ro", uri=True)
    try:
        return {key for (key,) in connection.execute("SELECT idempotency_key FROM deliveries WHERE tries > 0")}
    except sqlite3.OperationalError:  # no such table yet
        return set()
    finally:
        connection.close()


async def test_the_outbox_after_a_failover_repeats_with_the_same_keys(nats, data_dir, cards, tmp_path):
    """Transaction notifications of approvals made on n1 reach the partner after n1 dies: from n1
    before, from n2 after, each transaction always with its one X-Idempotency-Key."""
    import httpx

    from simulators.partner import PartnerSimSettings, running_partner
    from tests.test_notify_outbox import configure_partner

    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        config = data_dir / "authsrv.toml"
        config.write_text(config.read_text() + cluster_table(nats, "outbox", "n1"))
        assert run_cli("cluster", "join", "--data", str(tmp_path / "n2"), "--from", str(data_dir),
                       "--node", "n2").returncode == 0
        n1, n2 = Node(data_dir), Node(tmp_path / "n2")
        try:
            await trio.to_thread.run_sync(lambda: n1.start().wait(n1.primary, 30, "primary"))
            await trio.to_thread.run_sync(n2.start)
            sent: dict = {}
            answers: dict = {}
            async with httpx.AsyncClient(base_url=sim.url) as client:
                await client.post("/_sim/mode", json={"fail5xx": 1.0})  # n1's tries all fail
                await _load(n1.iso_port, cards, sent, answers, 15, 2)
                with trio.fail_after(10):  # n1 tried (and failed) once at least, well before its tries run out
                    while tried_by(data_dir) == set():
                        await trio.sleep(0.05)
                n1.kill()
                n1_tried = tried_by(data_dir)  # its outbox rows are pending, with their keys, in the replicated store
                await client.post("/_sim/mode", json={"fail5xx": 0.0})
                await trio.to_thread.run_sync(n2.wait, n2.primary, LEASE_S + 10, "takeover")
                approved = {rrn for rrn, answer in answers.items() if answer["39"] == "00"}
                deadline = trio.current_time() + 40
                while True:  # every try, failed or not, repeats included
                    calls = (await client.get("/_sim/received", params={"kind": "transaction", "limit": 1000})).json()
                    delivered = {call["body"]["transaction"]["externalTransactionId"] for call in calls["received"]
                                 if 200 <= call["status"] < 300}
                    if approved <= delivered or trio.current_time() > deadline:
                        break
                    await trio.sleep(0.25)
            assert approved <= delivered, approved - delivered
            keys: dict[str, set] = {}
            for call in calls["received"]:
                keys.setdefault(call["body"]["transaction"]["externalTransactionId"], set()).add(call["idempotencyKey"])
            assert all(len(found) == 1 for found in keys.values()), keys
            delivered_keys = {call["idempotencyKey"] for call in calls["received"] if 200 <= call["status"] < 300}
            assert n1_tried and n1_tried <= delivered_keys  # tried by n1, delivered by n2: the same keys
        finally:
            n1.stop()
            n2.stop()


@pytest.mark.slow
async def test_kill_9_rounds_under_load(shard, cards):
    """Five rounds: kill -9 of whichever node is primary under load, the other takes over within
    lease_s + 2, the killed one rejoins; at the end every approval any client got stands."""
    import random

    nodes = list(shard)
    nodes[0].start().wait(nodes[0].primary, 30, "primary")
    nodes[1].start()
    sent: dict = {}
    answers: dict = {}
    for _ in range(5):
        primary = next(node for node in nodes if node.primary())
        standby = next(node for node in nodes if node is not primary)
        await caught_up(standby, primary)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_load, primary.iso_port, cards, sent, answers, 200, 2)
            await trio.sleep(random.uniform(0.2, 0.6))
            primary.kill()
        takeover_s = await trio.to_thread.run_sync(standby.wait, standby.primary, LEASE_S + 10, "takeover")
        assert takeover_s <= LEASE_S + 2, takeover_s
        await trio.to_thread.run_sync(primary.start)
    primary = next(node for node in nodes if node.primary())
    final = await settle(primary.iso_port, sent)
    assert_answers_stand(answers, final)
    assert_books(primary.data_dir, cards, sent, final)
