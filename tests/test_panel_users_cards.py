"""The panel's Users and Cards pages over real HTTPS: search, a user's page, a card's page, and the
card actions (lock, unlock, remove, spend controls) checked on the ISO 8583 port, with the role
rules, CSRF and the audit entries."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from authsrv.store.db import AuditQuery, Role
from authsrv.store.index import CardStatus
from tests.isoclient import IsoClient, auth
from tests.restclient import https
from tests.test_panel_core import admin_password, csrf_of, panel_login

pytestmark = pytest.mark.timeout(60)
EMPLOYEE, MANAGER, PASSWORD = "emp-cards", "mgr-cards", "a-long-enough-password-1"


def button(label: str) -> re.Pattern[str]:
    return re.compile(rf"<button[^>]*>\s*{label}\s*</button>")


def masked(card: dict) -> str:
    return card["pan"][:6] + "******" + card["pan"][-4:]


def user_ids(page: httpx.Response) -> list[int]:
    return sorted({int(found) for found in re.findall(r'href="/panel/users/(\d+)"', page.text)})


async def purchase(server, card: dict, amount: int = 1000) -> str:
    client = await IsoClient.connect(server.iso_port)
    try:
        response = await client.call(auth(card, amount=amount, cvc2=card["cvc2"]))
    finally:
        await client.aclose()
    return response["39"]


def panel_entries(server, action: str) -> list:
    return server.store.audit_page(AuditQuery(channel="panel", action=action))


async def logged_in(client: httpx.AsyncClient, data_dir, username: str = "admin", password: str = "") -> None:
    reply = await panel_login(client, username, password or admin_password(data_dir))
    assert reply.status_code == 303, reply.text


async def test_search_by_name_phone_email_and_id(server, data_dir, cards):
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        newest = await client.get("/panel/users")
        assert newest.status_code == 200 and user_ids(newest) == list(range(1, 21))
        assert newest.text.index('href="/panel/users/20"') < newest.text.index('href="/panel/users/1"')
        by_name = await client.get("/panel/users", params={"q": "uSeR7"})  # case-insensitive substring
        assert user_ids(by_name) == [7]
        assert user_ids(await client.get("/panel/users", params={"q": "Seed User12"})) == [12]
        assert user_ids(await client.get("/panel/users", params={"q": "4890000000013"})) == [13]
        assert user_ids(await client.get("/panel/users", params={"q": "+48 90000000013"})) == [13]
        assert user_ids(await client.get("/panel/users", params={"q": "SEED14@example.invalid"})) == [14]
        by_id = await client.get("/panel/users", params={"q": "9"})
        assert 9 in user_ids(by_id) and "demo" in by_id.text and "SUCCESS" in by_id.text
        assert user_ids(await client.get("/panel/users", params={"q": "nobody-like-this"})) == []
        assert user_ids(await client.get("/panel/users", params={"q": "100%_"})) == []  # LIKE wildcards escaped
        first = await client.get("/panel/users", params={"q": "seed"})
        assert 'rel="next"' not in first.text  # 20 users: one page
        assert (await client.get("/panel/users", params={"page": "x"})).status_code == 400
        assert (await client.get("/panel/users", params={"page": "100000"})).status_code == 400
        assert (await client.get("/panel/users", params={"q": "x" * 101})).status_code == 400


async def test_search_scans_a_bounded_window_but_finds_exact_terms_anywhere(server, monkeypatch):
    from authsrv.store import panel_users

    monkeypatch.setattr(panel_users, "SEARCH_SCAN_MAX", 5)  # the newest 5 of 20 users
    found = lambda text: [user.id for user in panel_users.search_users(server.store, text)[0]]
    assert found("User3") == [] and found("User17") == [17]
    assert found("4890000000003") == [3] and found("seed3@example.invalid") == [3] and found("3") == [3]
    assert found("SEED3@EXAMPLE.INVALID") == [3]  # e-mail addresses are stored in lower case by the seed


async def test_search_pages_are_bounded(server, data_dir):
    for n in range(30):
        server.store.create_user(partner="demo", first_name="Paged", last_name=f"Person{n}", phone=f"4870000{n:05d}",
                                 email=f"paged{n}@example.invalid", birth_date="1990-01-01", state="VERIFIED",
                                 kyc="NONE")
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        first = await client.get("/panel/users", params={"q": "paged"})
        assert len(user_ids(first)) == 25 and 'rel="next"' in first.text
        second = await client.get("/panel/users", params={"q": "paged", "page": "2"})
        assert len(user_ids(second)) == 5 and 'rel="prev"' in second.text
        assert not set(user_ids(first)) & set(user_ids(second))


async def test_user_page_masked_cards_balances_and_no_full_pan(server, data_dir, cards):
    mine = [card for card in cards if card["customerId"] == 3]
    assert len(mine) == 2
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        page = await client.get("/panel/users/3")
        assert page.status_code == 200
        for card in mine:
            assert masked(card) in page.text and f'href="/panel/cards/{card["cardId"]}"' in page.text
        balance = server.store.get_balance(mine[0]["balanceId"])
        assert f'id="balance-{balance.id}"' in page.text
        if balance.iban:
            assert balance.iban in page.text
        assert "1,000.00" in page.text  # the seeded funds, booked and available (conftest SEED_AMOUNT)
        for section in ("KYC history", "Paired devices", "Recent transactions", "Seed User3", "4890000000003"):
            assert section in page.text
        # A purchase shows up in the user's recent transactions, masked.
        assert await purchase(server, mine[0], amount=1234) == "00"
        page = await client.get("/panel/users/3")
        assert "12.34 EUR" in page.text
        link = re.search(r'href="(/panel/transactions/[^"]+)"', page.text).group(1).replace("&amp;", "&")
        assert link.endswith(f"?card={mine[0]['cardId']}")
        transaction = await client.get(link)  # the transactions page knows the history's id
        assert transaction.status_code == 200 and "12.34" in transaction.text
        assert "1,000.00" in page.text and "987.66" in page.text  # booked stays, available drops by the hold
        pages = [page, await client.get("/panel/users"), await client.get("/panel/users", params={"q": "3"})]
        pages += [await client.get(f"/panel/cards/{card['cardId']}") for card in mine]
        for shown in pages:
            assert shown.status_code == 200
            for card in cards:
                assert card["pan"] not in shown.text
        assert (await client.get("/panel/users/999999")).status_code == 404
        assert (await client.get("/panel/users/abc")).status_code == 404
        assert (await client.get("/panel/cards/999999")).status_code == 404


async def test_user_page_kyc_history_links_forms(server, data_dir):
    store = server.store
    form_id = store.reserve_kyc_form_id()
    store.insert_kyc_form(form_id, user_id=5, partner="demo", fields_json="{}", images_json="[]")
    store.decide_kyc_form(form_id, state="REJECTED", decided_by="admin", reason="blurred photo")
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        page = await client.get("/panel/users/5")
        assert f'href="/panel/kyc/{form_id}"' in page.text and "REJECTED" in page.text and "blurred photo" in page.text


async def test_lock_declines_on_the_iso_port_unlock_approves(server, data_dir, cards):
    card = cards[0]
    path = f"/panel/cards/{card['cardId']}"
    assert await purchase(server, card) == "00"
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        page = await client.get(path)
        assert page.status_code == 200 and masked(card) in page.text and card["pan"] not in page.text
        assert button("Lock").search(page.text) and not button("Unlock").search(page.text)
        assert re.search(r'<select[^>]*name="reason"', page.text)
        for code in range(1, 9):
            assert f'<option value="{code}"' in page.text
        locked = await client.post(f"{path}/lock", data={"reason": "3", "csrf_token": csrf_of(page)})
        assert locked.status_code == 303 and locked.headers["location"] == path
        assert server.index.card_by_id(card["cardId"]).status == CardStatus.locked  # before the page answered
        assert await purchase(server, card) == "05"  # pending query
        page = await client.get(path)
        assert "locked: Pending query" in page.text  # the flash
        assert button("Unlock").search(page.text) and button("Lock").search(page.text)  # Lock: change the reason
        assert '<option value="3" selected>' in page.text
        relocked = await client.post(f"{path}/lock", data={"reason": "7", "csrf_token": csrf_of(page)})
        assert relocked.status_code == 303 and await purchase(server, card) == "59"  # suspected fraud
        unlocked = await client.post(f"{path}/unlock", data={"csrf_token": csrf_of(page)})
        assert unlocked.status_code == 303
        assert await purchase(server, card) == "00"
        page = await client.get(path)
        assert "unlocked: ACTIVE" in page.text  # the flash
        for action in ("card.lock", "card.unlock"):  # the card's history: operator actions and events
            assert f'data-label="Action">{action}<' in page.text
        assert 'data-label="Event">card.locked<' in page.text and "reason 3 (Pending query)" in page.text
    lock, relock = reversed(panel_entries(server, "card.lock"))
    unlock = panel_entries(server, "card.unlock")[0]
    assert json.loads(relock.before_json) == {"status": "LOCKED", "lockReason": 3}
    assert json.loads(relock.after_json) == {"status": "LOCKED", "lockReason": 7}
    assert (lock.actor, lock.target, lock.outcome) == ("admin", f"card:{card['cardId']}", "ok")
    assert json.loads(lock.before_json) == {"status": "ACTIVE", "lockReason": 0}
    assert json.loads(lock.after_json) == {"status": "LOCKED", "lockReason": 3}
    assert json.loads(unlock.before_json) == {"status": "LOCKED", "lockReason": 7}
    assert json.loads(unlock.after_json) == {"status": "ACTIVE", "lockReason": 0}
    # The same partner events as through the REST API.
    kinds = [event.kind for event in server.store.events(partner="demo", limit=1000)
             if event.subject == f"card:{card['cardId']}"]
    assert kinds[-3:] == ["card.locked", "card.locked", "card.unlocked"]


async def test_employee_locks_but_cannot_unlock(server, data_dir, cards):
    server.store.create_admin(EMPLOYEE, Role.employee, PASSWORD, created_by="admin")
    card = cards[1]
    path = f"/panel/cards/{card['cardId']}"
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir, EMPLOYEE, PASSWORD)
        page = await client.get(path)
        assert button("Lock").search(page.text)
        assert not button("Remove card").search(page.text) and "Save spend controls" not in page.text
        token = csrf_of(page)
        assert (await client.post(f"{path}/lock", data={"reason": "7", "csrf_token": token})).status_code == 303
        assert await purchase(server, card) == "59"  # suspected fraud
        page = await client.get(path)
        assert not button("Unlock").search(page.text) and "Only a Manager or an Admin" in page.text
        forged = await client.post(f"{path}/unlock", data={"csrf_token": token})
        assert forged.status_code == 403
        assert (await client.post(f"{path}/remove", data={"csrf_token": token, "confirm": "yes"})).status_code == 403
        assert (await client.post(f"{path}/controls", data={"csrf_token": token})).status_code == 403
        assert server.store.get_card(card["cardId"]).status == CardStatus.locked
        assert await purchase(server, card) == "59"
    refused = server.store.audit_page(AuditQuery(actor=EMPLOYEE, action="refused:cards/{cardId}/unlock"))
    assert refused and refused[0].outcome == "forbidden" and refused[0].target == f"{path}/unlock"
    lock = panel_entries(server, "card.lock")[0]
    assert (lock.actor, lock.role) == (EMPLOYEE, "Employee")
    # A Manager may unlock it.
    server.store.create_admin(MANAGER, Role.manager, PASSWORD, created_by="admin")
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir, MANAGER, PASSWORD)
        page = await client.get(path)
        assert button("Unlock").search(page.text)
        assert (await client.post(f"{path}/unlock", data={"csrf_token": csrf_of(page)})).status_code == 303
    assert await purchase(server, card) == "00"


async def test_post_without_csrf_token_is_refused(server, data_dir, cards):
    card = cards[2]
    path = f"/panel/cards/{card['cardId']}"
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        await client.get(path)
        assert (await client.post(f"{path}/lock", data={"reason": "3"})).status_code == 403
        assert (await client.post(f"{path}/lock", data={"reason": "3", "csrf_token": "forged"})).status_code == 403
        assert (await client.post(f"{path}/controls", data={"per_transaction": "1"})).status_code == 403
    assert server.store.get_card(card["cardId"]).status == CardStatus.active
    assert await purchase(server, card) == "00"
    assert not panel_entries(server, "card.lock")


async def test_irreversible_lock_has_no_unlock_and_a_forged_unlock_is_refused(server, data_dir, cards):
    card = cards[3]
    path = f"/panel/cards/{card['cardId']}"
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        page = await client.get(path)
        token = csrf_of(page)
        assert (await client.post(f"{path}/lock", data={"reason": "2", "csrf_token": token})).status_code == 303
        assert await purchase(server, card) == "43"  # stolen
        page = await client.get(path)
        assert not button("Unlock").search(page.text) and "irreversible" in page.text
        forged = await client.post(f"{path}/unlock", data={"csrf_token": token})
        assert forged.status_code == 409 and "CARD_LOCKED_IRREVERSIBLY" in forged.text
        assert not button("Unlock").search(forged.text)
        assert server.store.get_card(card["cardId"]).lock_reason == 2
        assert await purchase(server, card) == "43"
        softer = await client.post(f"{path}/lock", data={"reason": "3", "csrf_token": token})  # cannot soften it
        assert softer.status_code == 303
        assert "keeps its irreversible reason (Stolen)" in (await client.get(path)).text
        assert server.store.get_card(card["cardId"]).lock_reason == 2
        # Bad input is a 400 with the form again, not a 500.
        other = f"/panel/cards/{cards[4]['cardId']}"
        for bad in ({}, {"reason": "9"}, {"reason": "0"}, {"reason": "x"}):
            reply = await client.post(f"{other}/lock", data={**bad, "csrf_token": token})
            assert reply.status_code == 400 and "Choose a lock reason" in reply.text
    refused = panel_entries(server, "card.unlock")[0]
    assert refused.outcome == "refused: CARD_LOCKED_IRREVERSIBLY"
    assert json.loads(refused.before_json) == json.loads(refused.after_json) == {"status": "LOCKED", "lockReason": 2}


async def test_remove_needs_confirmation(server, data_dir, cards):
    card = cards[5]
    path = f"/panel/cards/{card['cardId']}"
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        page = await client.get(path)
        assert button("Remove card").search(page.text) and 'name="confirm"' in page.text
        token = csrf_of(page)
        unconfirmed = await client.post(f"{path}/remove", data={"csrf_token": token})
        assert unconfirmed.status_code == 400 and "tick the confirmation" in unconfirmed.text
        assert await purchase(server, card) == "00"
        removed = await client.post(f"{path}/remove", data={"csrf_token": token, "confirm": "yes"})
        assert removed.status_code == 303
        assert await purchase(server, card) == "14"
        page = await client.get(path)
        assert "REMOVED" in page.text and not button("Lock").search(page.text)
        again = await client.post(f"{path}/remove", data={"csrf_token": token, "confirm": "yes"})
        assert again.status_code == 404 and "CARD_NOT_FOUND" in again.text
    entry = panel_entries(server, "card.remove")
    assert entry[1].outcome == "ok" and json.loads(entry[1].after_json) == {"status": "REMOVED", "lockReason": 0}


async def test_spend_controls_edit_reaches_the_switch(server, data_dir, cards):
    card = cards[6]
    path = f"/panel/cards/{card['cardId']}"
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        token = csrf_of(await client.get(path))
        form = {"csrf_token": token, "per_transaction": "5.00", "daily_count": "3", "blocked_mccs": "7995, 5816",
                "blocked_countries": "de", "blocked_mcc_groups": ["gambling"], "channel_ecommerce": "on",
                "channel_atm": "on", "channel_contactless": "on"}
        saved = await client.post(f"{path}/controls", data=form)
        assert saved.status_code == 303
        assert await purchase(server, card, amount=1000) == "61"  # over 5.00 per transaction
        assert await purchase(server, card, amount=400) == "00"
        page = await client.get(path)
        assert 'value="5.00"' in page.text and "7995, 5816" in page.text and "DE" in page.text
        # Validation: the REST decoder's rules, as a message on the form (400), nothing changed.
        for bad, message in (({"per_transaction": "abc"}, "Per transaction"), ({"daily_count": "-1"}, "Daily count"),
                             ({"blocked_mccs": "12345"}, "Blocked MCCs"), ({"blocked_countries": "POL"}, "Blocked countries"),
                             ({"per_transaction": "1.234"}, "at most 2 decimals")):
            reply = await client.post(f"{path}/controls", data={**form, **bad})
            assert reply.status_code == 400 and message in reply.text, (bad, reply.text)
        assert await purchase(server, card, amount=1000) == "61"
        cleared = await client.post(f"{path}/controls", data={"csrf_token": token, **{
            f"channel_{name}": "on" for name in ("ecommerce", "atm", "contactless", "magstripe")}})
        assert cleared.status_code == 303
        assert await purchase(server, card, amount=1000) == "00"
    first, second = reversed(panel_entries(server, "card.controls"))
    assert json.loads(first.before_json)["controls"]["perTransaction"] is None
    assert json.loads(first.after_json)["controls"]["perTransaction"] == 500
    assert json.loads(first.after_json)["controls"]["channels"]["magstripe"] is False
    assert json.loads(second.before_json)["controls"]["perTransaction"] == 500
    assert json.loads(second.after_json)["controls"]["perTransaction"] is None
    events = [event for event in server.store.events(partner="demo", limit=1000) if event.kind == "card.limits_set"]
    assert json.loads(events[0].body)["limits"]["perTransaction"] == 500


async def test_login_from_chromium_same_origin_form_with_origin_null(server, data_dir):
    """Chromium sends `Origin: null` for a same-origin form POST from a no-referrer page."""
    async with https(data_dir, server.rest_port) as client:
        for headers, status in (({"origin": "null"}, 403), ({"origin": "null", "sec-fetch-site": "cross-site"}, 403),
                                ({"origin": "https://evil.example", "sec-fetch-site": "same-origin"}, 403),
                                ({"origin": "null", "sec-fetch-site": "same-origin"}, 303)):  # last: logs in
            form = await client.get("/panel/login")
            reply = await client.post("/panel/login", headers=headers, data={
                "username": "admin", "password": admin_password(data_dir), "csrf_token": csrf_of(form)})
            assert reply.status_code == status, headers


async def test_reload_a_user_balance_once_per_form(server, data_dir, cards):
    card = next(card for card in cards if card["customerId"] == 4)
    balance = server.store.get_balance(card["balanceId"])
    path, action = "/panel/users/4", f"/panel/users/4/balances/{balance.id}/reload"
    booked = lambda: server.ledger.ledger.balance(balance.ledger_account_id).posted
    start = booked()
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir)
        page = await client.get(path)
        assert button("Reload balance").search(page.text)
        key = re.search(r'name="idempotency_key" value="([^"]+)"', page.text).group(1)
        form = {"csrf_token": csrf_of(page), "idempotency_key": key, "amount": "25.50"}
        assert (await client.post(action, data=form)).status_code == 303
        assert booked() == start + 2550
        page = await client.get(path)
        assert "1,025.50" in page.text and "reloaded with 25.50 EUR" in page.text
        assert (await client.post(action, data=form)).status_code == 303  # the same form again: nothing moves
        assert booked() == start + 2550
        reused = await client.post(action, data={**form, "amount": "30"})
        assert reused.status_code == 409 and "IDEMPOTENCY_KEY_REUSED" in reused.text
        for amount, message in (("abc", "a positive amount"), ("0", "more than zero"), ("1.001", "at most 2 decimals"),
                                ("", "type the amount"), ("2000000000", "at most")):
            reply = await client.post(action, data={**form, "amount": amount})
            assert reply.status_code == 400 and message in reply.text, amount
        assert (await client.post(action, data={**form, "idempotency_key": ""})).status_code == 400
        other = await client.post(f"/panel/users/5/balances/{balance.id}/reload", data=form)  # not user 5's
        assert other.status_code == 404
        assert booked() == start + 2550
    entries = panel_entries(server, "balance.reload")
    assert [entry.outcome for entry in entries] == ["refused: idempotency_key_reused", "ok", "ok"]
    assert json.loads(entries[2].before_json)["booked"] == start
    assert json.loads(entries[2].after_json)["booked"] == start + 2550
    server.store.create_admin(EMPLOYEE, Role.employee, PASSWORD, created_by="admin")
    async with https(data_dir, server.rest_port) as client:
        await logged_in(client, data_dir, EMPLOYEE, PASSWORD)
        page = await client.get(path)
        assert not button("Reload balance").search(page.text)
        forged = await client.post(action, data={"csrf_token": csrf_of(page), "idempotency_key": "k", "amount": "5"})
        assert forged.status_code == 403
    assert booked() == start + 2550
