"""`make panel` (simulators/panel_demo.py): it starts a server with demo data, prints where the panel
is and how to log in, serves the login page and a KYC queue with work, drives traffic that the
dashboard counts, and stops cleanly on Ctrl-C (SIGINT) within a bounded time."""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from simulators.panel_demo import document_photo, png

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 40.0
pytestmark = pytest.mark.timeout(180)


def test_png_encoder_makes_a_valid_image():
    image = png(3, 2, lambda x, y: (x * 80, y * 100, 7))
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and image[12:16] == b"IHDR" and image.endswith(b"IEND\xaeB`\x82")
    from authsrv.rest.kyc import image_content_type

    assert image_content_type(document_photo(1, "front")) == "image/png"


def _wait_for_banner(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Press Ctrl-C to stop" in text:
            return text
        assert process.poll() is None, f"panel demo exited {process.returncode}:\n{text[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no banner within {START_TIMEOUT_S:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def test_panel_demo_serves_the_panel_and_stops_on_ctrl_c(tmp_path: Path):
    data = tmp_path / "panel-demo"
    log = tmp_path / "out.txt"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "simulators.panel_demo", "--data", str(data), "--users", "6",
                                    "--rate", "5", "--rest-port", "0"], stdout=out, stderr=subprocess.STDOUT)
    try:
        banner = _wait_for_banner(process, log)
        url = re.search(r"https://127\.0\.0\.1:(\d+)/panel/", banner)
        password = re.search(r"password:\s+(\S+)", banner).group(1)
        assert url and "username:              admin" in banner
        assert password == (data / "admin-password").read_text().strip()
        assert str(data / "pki" / "ca.crt") in banner and "3 KYC forms waiting" in banner
        context = ssl.create_default_context(cafile=str(data / "pki" / "ca.crt"))  # the CA it says to trust
        with httpx.Client(base_url=f"https://127.0.0.1:{url.group(1)}", verify=context, timeout=10) as client:
            login = client.get("/panel/login")
            assert login.status_code == 200 and 'name="username"' in login.text
            token = re.search(r'name="csrf_token" value="([^"]+)"', login.text).group(1)
            assert client.post("/panel/login", data={"username": "admin", "password": password,
                                                     "csrf_token": token}).status_code == 303
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # the traffic reaches the dashboard
                live = client.get("/panel/dashboard/live").text
                total = re.search(r'id="auth-total">([\d,]+)<', live).group(1)
                if int(total.replace(",", "")) > 0:
                    break
                time.sleep(0.5)
            else:
                raise AssertionError("no authorization counted on the dashboard within 20 s")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "server stopped (exit 0)" in text and "Traceback" not in text
    assert not (data / "run.json").exists()  # the server removed it when it stopped


def test_make_demo_ends_with_how_to_open_the_panel():
    from simulators.demo import panel_hint

    hint = panel_hint(Path("/srv/demo-data"))
    assert "make panel" in hint and "https://127.0.0.1:8443/panel/" in hint
    assert "/srv/demo-data/admin-password" in hint and "authsrv serve --data /srv/demo-data" in hint


def test_docs_panel_shows_the_screenshots_the_browser_suite_makes():
    repo = Path(__file__).resolve().parent.parent
    text = (repo / "docs" / "panel.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]+\]\((panel/[a-z-]+\.png)\)", text)
    assert len(images) >= 9
    for image in images:
        assert (repo / "docs" / image).read_bytes().startswith(b"\x89PNG"), image
    suite = (repo / "tests" / "test_panel_browser.py").read_text(encoding="utf-8")
    made = set(re.findall(r'shoot\(page, shots, "([a-z-]+)"', suite))
    made |= set(re.findall(r'\("/panel/[a-z-]+", "([a-z-]+)"\)', suite))  # the pages shot in a loop
    assert {f"panel/{name}.png" for name in made} == set(images)
    assert "docs/panel.md" in (repo / "README.md").read_text(encoding="utf-8")
    assert "docs/panel.md" in (repo / "docs" / "operations.md").read_text(encoding="utf-8")
