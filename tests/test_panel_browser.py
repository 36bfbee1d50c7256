"""The Administration Panel in a real browser: Debian's Chromium driven by Playwright (sync API).

One `authsrv serve` subprocess (seeded data) for the module; the walk: log in and out; review a KYC
form submitted through the partner channel (its image loads, `Accept`); lock a card on its page
(`reason`, `Lock`) and see an ISO purchase declined over the ISO port, `Unlock` and see it
approved; an Employee who may lock but not unlock (no `Unlock` button, and a forged POST refused
with 403); a CSRF refusal (a wrong token: 403); search (users by name, transactions by RRN); the
audit entries of all this; the dashboard and a card page at a phone's width without horizontal
scrolling. The tests run in file order against one server and build on each other (the search
finds the KYC test's customer, the audit page shows the earlier tests' actions). Every page
visited is saved as a screenshot: to $PANEL_SCREENSHOTS (`make
panel-screenshots` sets docs/panel) or a temporary directory.

Chromium is Debian's (`/usr/bin/chromium`, installed by .ci/run with apt): `playwright install`
downloads browsers and is never used. Without Chromium the module is skipped, saying why.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
import trio

CHROMIUM = next((path for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if path and os.path.exists(path)), None)  # fmt: skip
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it): "
                "the real-browser panel suite needs it", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")

from authsrv.pki import client_ssl_context  # noqa: E402
from simulators.panel_demo import document_photo, face_photo, kyc_form  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402
from tests.isoclient import IsoClient, auth  # noqa: E402

expect = playwright_api.expect
pytestmark = pytest.mark.timeout(120)

DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 740}
EMPLOYEE = ("clerk", "employee-password-1")
KYC_NAME = ("Leon", "Bakiewicz")
ACTION_TIMEOUT_MS = 20_000  # a page answers in milliseconds, but make test shares two cores with everything
LOCK_REASON = "3"  # "pending query": reversible, answered 05 (docs/contract.md, response codes)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(template_dir: Path, tmp_path_factory):
    """A seeded server as a subprocess (trio stays out of the test process's Playwright)."""
    data = tmp_path_factory.mktemp("panel-browser") / "data"
    shutil.copytree(template_dir, data)
    server = ServerProcess(data).start()
    server.base = f"https://127.0.0.1:{server.rest_port}"
    server.password = (data / "admin-password").read_text().strip()
    server.cards = [__import__("json").loads(line) for line in (data / "cards.jsonl").read_text().splitlines()]
    yield server
    try:
        assert server.terminate() == 0, server.read_log()[-2000:]
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    wanted = os.environ.get("PANEL_SCREENSHOTS")
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("panel-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page_for(browser):
    """new(viewport) -> a page in a fresh context (its own cookies), closed after the test."""
    contexts = []

    def new(viewport=DESKTOP):
        context = browser.new_context(ignore_https_errors=True, viewport=viewport)
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        contexts.append(context)
        return context.new_page()

    yield new
    for context in contexts:
        context.close()


# -- helpers ---------------------------------------------------------------------------------------


def shoot(page, shots: Path, name: str, *, full_page: bool = False) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=full_page)


def login(page, base: str, username: str, password: str, shots: Path | None = None) -> None:
    page.goto(f"{base}/panel/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    if shots is not None:
        shoot(page, shots, "login")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{base}/panel/")
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


def iso_purchase(port: int, card: dict, amount: int = 1500) -> tuple[str, str]:
    """One 0100 purchase over the ISO port: (field 39, the RRN sent)."""
    async def call() -> dict:
        client = await IsoClient.connect(port)
        try:
            return await client.call(auth(card, amount=amount, cvc2=card["cvc2"]))
        finally:
            await client.aclose()

    response = trio.run(call)
    return response["39"], response["37"]


def https_client(live, stem: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=live.base, verify=client_ssl_context(live.data_dir / "pki", stem), timeout=20)


def flash(page):
    return page.locator(".flash")


def no_horizontal_scroll(page) -> None:
    widths = page.evaluate("() => [document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[2] and widths[1] <= widths[2], f"scroll widths {widths[:2]} > viewport {widths[2]}"


# -- the walk --------------------------------------------------------------------------------------


def test_login_and_logout(live, page_for, shots):
    page = page_for()
    page.goto(f"{live.base}/panel/")
    expect(page).to_have_url(f"{live.base}/panel/login")  # no session: the login form
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("Wrong username or password")
    login(page, live.base, "admin", live.password, shots)
    cookie = next(c for c in page.context.cookies() if c["name"] == "authsrv_panel")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    for path in ("/panel/users", "/panel/kyc", "/panel/transactions", "/panel/partner-balances", "/panel/summary",
                 "/panel/audit"):
        expect(page.locator(f'header nav a[href="{path}"]')).to_have_count(1)
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(f"{live.base}/panel/login")
    page.goto(f"{live.base}/panel/")
    expect(page).to_have_url(f"{live.base}/panel/login")  # the session is gone


def test_kyc_review_with_its_image(live, page_for, shots):
    first, last = KYC_NAME
    with https_client(live, "partner") as partner:
        created = partner.post("/lifecycle/v1/wallet", json={
            "firstName": first, "lastName": last, "phone": "48500600701", "email": "leon@example.com",
            "birthDate": "1970-01-01", "wPIN": "5058", "state": "VERIFIED", "kyc": "PENDING"})
        assert created.status_code == 201, created.text
        customer_id = created.json()["customerId"]
        images = {"imageFront": ("front.png", document_photo(0, "front"), "image/png"),
                  "imageFace": ("face.png", face_photo(0), "image/png")}
        submitted = partner.post(f"/secure/customers/{customer_id}/register", data=kyc_form(first, last, "2099-01-30"),
                                 files=images)
        assert submitted.status_code == 201, submitted.text
        form_id = submitted.json()["formId"]
    live.kyc_customer = customer_id

    page = page_for()
    login(page, live.base, "admin", live.password)
    page.goto(f"{live.base}/panel/kyc")
    page.locator(f'a[href="/panel/kyc/{form_id}"]').first.click()
    expect(page).to_have_url(f"{live.base}/panel/kyc/{form_id}")
    images = page.locator(f'img[src^="/panel/kyc/{form_id}/images/"]')
    expect(images).to_have_count(2)
    page.wait_for_function("() => Array.from(document.images).every(image => image.complete)")
    widths = images.evaluate_all("nodes => nodes.map(node => node.naturalWidth)")
    assert all(width > 0 for width in widths), widths  # decrypted and served to the browser
    images.first.evaluate("image => image.scrollIntoView({block: 'center'})")  # the screenshot shows them
    shoot(page, shots, "kyc-form")
    page.get_by_role("button", name="Accept").click()
    expect(page).to_have_url(f"{live.base}/panel/kyc/{form_id}")
    expect(flash(page)).to_contain_text("accepted")
    expect(page.get_by_role("button", name="Accept")).to_have_count(0)  # decided: no second decision


def test_lock_declines_on_the_iso_port_and_unlock_approves(live, page_for, shots):
    card = live.cards[0]
    assert iso_purchase(live.iso_port, card)[0] == "00"
    page = page_for()
    login(page, live.base, "admin", live.password)
    page.goto(f"{live.base}/panel/cards/{card['cardId']}")
    assert card["pan"] not in page.content()  # masked, never the full PAN
    page.locator('select[name="reason"]').first.select_option(LOCK_REASON)
    page.get_by_role("button", name="Lock", exact=True).click()
    expect(flash(page)).to_contain_text("locked")
    code, _ = iso_purchase(live.iso_port, card)
    assert code == "05"  # the lock reached the switch before the page answered
    shoot(page, shots, "card")
    page.get_by_role("button", name="Unlock").click()
    expect(flash(page)).to_contain_text("unlocked")
    code, rrn = iso_purchase(live.iso_port, card)
    assert code == "00"
    live.approved_rrn = rrn


def test_employee_may_lock_but_not_unlock(live, page_for):
    with https_client(live) as client:
        token = client.post("/admin/sessions", json={"username": "admin", "password": live.password}).json()["token"]
        created = client.post("/admin/users", headers={"authorization": f"Bearer {token}"},
                              json={"username": EMPLOYEE[0], "role": "Employee", "password": EMPLOYEE[1]})
        assert created.status_code == 201, created.text
    card = live.cards[2]
    page = page_for()
    login(page, live.base, *EMPLOYEE)
    page.goto(f"{live.base}/panel/cards/{card['cardId']}")
    page.locator('select[name="reason"]').first.select_option(LOCK_REASON)
    page.get_by_role("button", name="Lock", exact=True).click()
    expect(flash(page)).to_contain_text("locked")
    expect(page.get_by_role("button", name="Unlock")).to_have_count(0)  # hidden from an Employee ...
    csrf = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    forged = page.request.post(f"{live.base}/panel/cards/{card['cardId']}/unlock", form={"csrf_token": csrf},
                               max_redirects=0)
    assert forged.status == 403  # ... and refused by the server with a valid session and token
    assert iso_purchase(live.iso_port, card)[0] == "05"  # still locked


def test_a_post_with_a_wrong_csrf_token_is_refused(live, page_for):
    card = live.cards[4]
    page = page_for()
    login(page, live.base, "admin", live.password)
    page.goto(f"{live.base}/panel/cards/{card['cardId']}")
    page.locator('form[action$="/lock"] input[name="csrf_token"]').first.evaluate("input => input.value = 'forged'")
    with page.expect_response(lambda response: response.request.method == "POST") as answer:
        page.get_by_role("button", name="Lock", exact=True).click()
    assert answer.value.status == 403
    expect(page.get_by_role("alert")).to_contain_text("CSRF")
    assert iso_purchase(live.iso_port, card)[0] == "00"  # nothing was locked


def test_search_users_by_name_and_transactions_by_rrn(live, page_for, shots):
    page = page_for()
    login(page, live.base, "admin", live.password)
    page.goto(f"{live.base}/panel/users?q={KYC_NAME[1]}")
    page.locator(f'a[href="/panel/users/{live.kyc_customer}"]').first.click()
    expect(page).to_have_url(f"{live.base}/panel/users/{live.kyc_customer}")
    expect(page.locator("main")).to_contain_text(KYC_NAME[1])
    page.goto(f"{live.base}/panel/users/{live.cards[0]['customerId']}")
    shoot(page, shots, "user")
    page.goto(f"{live.base}/panel/transactions")
    page.get_by_label("RRN").fill(live.approved_rrn)
    page.locator('form[action="/panel/transactions"] button[type="submit"]').click()
    expect(page.locator("main table")).to_contain_text(live.approved_rrn)
    assert live.cards[0]["pan"] not in page.content()
    page.goto(f"{live.base}/panel/transactions?card={live.cards[0]['cardId']}")  # a card's transactions
    results = page.locator("main table").first
    expect(results).to_contain_text(live.approved_rrn)
    results.evaluate("table => table.scrollIntoView({block: 'start'})")
    shoot(page, shots, "transactions")


def test_audit_shows_the_actions_and_the_other_pages(live, page_for, shots):
    for card in live.cards[6:12]:  # some traffic for the dashboard's figures and chart
        iso_purchase(live.iso_port, card, amount=2500)
    page = page_for()
    login(page, live.base, "admin", live.password)
    page.goto(f"{live.base}/panel/audit")
    table = page.locator("#audit")
    for action in ("card.lock", "card.unlock", "kyc.accept", "session.login", "session.logout"):
        expect(table).to_contain_text(action)
    page.get_by_label("Who").fill(EMPLOYEE[0])
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("#audit tbody tr")
    expect(rows.filter(has_text="card.lock")).to_have_count(1)
    expect(rows.filter(has_text="forbidden")).to_have_count(1)  # the refused unlock
    page.goto(f"{live.base}/panel/audit")
    shoot(page, shots, "audit")
    for path, name in (("/panel/partner-balances", "partner-balances"), ("/panel/summary", "summary")):
        page.goto(f"{live.base}{path}")
        expect(page.locator("h1")).to_be_visible()
        shoot(page, shots, name)
    page.goto(f"{live.base}/panel/")
    expect(page.locator("#auth-total")).not_to_have_text("0")
    expect(page.locator("svg.chart")).to_be_visible()
    shoot(page, shots, "dashboard", full_page=True)  # figures, codes, chart and ledger totals
    # The live refresh (panel.js) replaces the figures without a reload.
    expect(page.locator("#live")).to_have_attribute("data-updated", re.compile(r"\d{4}-"))


def test_phone_width_without_horizontal_scroll(live, page_for, shots):
    page = page_for(PHONE)
    login(page, live.base, "admin", live.password)
    no_horizontal_scroll(page)
    shoot(page, shots, "dashboard-phone")
    page.goto(f"{live.base}/panel/cards/{live.cards[0]['cardId']}")
    expect(page.get_by_role("button", name="Lock", exact=True)).to_be_visible()
    no_horizontal_scroll(page)
    page.goto(f"{live.base}/panel/audit")  # long action names and values wrap
    expect(page.locator("#audit")).to_be_visible()
    no_horizontal_scroll(page)
