"""`authsrv init --data DIR`: a complete, working data directory (docs/contract.md, commands).

Everything is built in a hidden staging directory next to DIR and renamed into place at the end,
so DIR is either absent (or still empty) or complete: a crash or error half-way never leaves a
data directory that the server would half-trust. The staging directory is removed on error.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from authsrv import cardsec, pki
from authsrv.config import PartnerConfig, load_config, render_default_config
from authsrv.store.db import STORE_FILE_NAME, ProgramRow, Role, Store
from ledger.types import AccountStatus, Batch

DEMO_PARTNER = "demo"
DEMO_PARTNER_FILE_STEM = "partner"  # docs/contract.md, commands: DIR/pki/partner.crt/.key for demo
DEMO_CONFIG_ID = "0019167984"  # the sandbox configId of the reference documents
DEMO_BIN = "535522"
DEMO_CURRENCY = "EUR"
DEMO_EXPIRY_YEARS = 3
# IBANs of the demo program's balances: Germany (22 characters, no national check digit in the
# BBAN) and an invented 8-digit bank code (Bankleitzahl) that no German bank uses.
DEMO_IBAN_COUNTRY = "DE"
DEMO_IBAN_BANK_CODE = "99990000"
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD_FILE = "admin-password"
ADMIN_PASSWORD_BYTES = 18  # 144 bits, 24 URL-safe characters


class InitError(Exception):
    """DIR cannot be initialised (it exists and is not empty, or a step failed)."""


def init_data_dir(data_dir: Path) -> None:
    data_dir = Path(data_dir)
    _refuse_existing(data_dir)
    parent = data_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.init-", dir=parent))
    except OSError as error:
        raise InitError(f"cannot create {data_dir}: {error.strerror}") from None
    try:
        summary = _populate(staging)
        _move_into_place(staging, data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"initialised {data_dir}")
    for line in summary:
        print(f"  {line}")


def _refuse_existing(data_dir: Path) -> None:
    if not data_dir.exists() and not data_dir.is_symlink():
        return
    if not data_dir.is_dir() or data_dir.is_symlink():
        raise InitError(f"{data_dir} exists and is not a directory; refusing to overwrite it")
    if any(data_dir.iterdir()):
        raise InitError(f"{data_dir} exists and is not empty; refusing to overwrite it")


def _populate(directory: Path) -> list[str]:
    """Create every file of the layout in `directory`; returns what to tell the operator."""
    config_text = render_default_config({DEMO_PARTNER: PartnerConfig(collateral="deposit")})
    _write_new_file(directory / "authsrv.toml", config_text, 0o644)
    cardsec.CardKeys.generate().write(directory / "keys")
    from authsrv.rest.jwe import SERVER_KEY_FILE, ServerKey  # the REST stack; only init needs it here
    ServerKey.create(directory / "keys" / SERVER_KEY_FILE)
    pki_dir = directory / "pki"
    pki.create_ca(pki_dir)
    pki.issue_server_cert(pki_dir)
    pki.issue_client_cert(pki_dir, DEMO_PARTNER, DEMO_PARTNER_FILE_STEM)
    password = secrets.token_urlsafe(ADMIN_PASSWORD_BYTES)
    _write_new_file(directory / ADMIN_PASSWORD_FILE, password + "\n", 0o600)
    with Store.open(directory / STORE_FILE_NAME, create=True) as store:
        _fill_store(store, password)
        accounts = store.all_ledger_accounts()
    _create_ledger_accounts(directory / "ledger", accounts)
    config = load_config(directory)  # read back what we wrote: the server must accept it
    assert DEMO_PARTNER in config.partners
    return [
        "authsrv.toml: every setting at its default, partner demo",
        "keys/: pan.key, index.key, cvk.hex, pvk.hex, zpk.hex, jwe.key (mode 0600)",
        "pki/: ca.crt, server.crt/.key (127.0.0.1, localhost), partner.crt/.key (demo)",
        f"admin user {ADMIN_USERNAME!r} (Admin): password in {ADMIN_PASSWORD_FILE} (mode 0600)",
        f"partner {DEMO_PARTNER!r}: internal balances, deposit collateral in {DEMO_CURRENCY}",
        f"card program {DEMO_CONFIG_ID}: virtual, {DEMO_CURRENCY}, BIN {DEMO_BIN},"
        f" no fees, no spend limits, {DEMO_EXPIRY_YEARS}-year expiry,"
        f" IBANs {DEMO_IBAN_COUNTRY} bank code {DEMO_IBAN_BANK_CODE}, a {DEMO_CURRENCY} balance on KYC success",
        f"store.db and ledger/ ({len(accounts)} system and partner accounts)",
    ]


def _fill_store(store: Store, admin_password: str) -> None:
    with store.transaction():
        store.add_partner(DEMO_PARTNER, balance_mode="internal", collateral="deposit")
        store.add_program(
            ProgramRow(
                config_id=DEMO_CONFIG_ID,
                partner=DEMO_PARTNER,
                bin=DEMO_BIN,
                card_type="virtual",
                currency=DEMO_CURRENCY,
                expiry_years=DEMO_EXPIRY_YEARS,
                fees_json="{}",
                limits_json="{}",
                iban_country=DEMO_IBAN_COUNTRY,
                iban_bank_code=DEMO_IBAN_BANK_CODE,
                auto_balance=1,
            )
        )
        store.add_admin(ADMIN_USERNAME, Role.admin, admin_password)
        store.ensure_system_accounts(DEMO_CURRENCY)
        store.ensure_partner_accounts(DEMO_PARTNER, DEMO_CURRENCY)


def _create_ledger_accounts(ledger_dir: Path, accounts: list) -> None:
    from ledger.durable import DurableLedger  # the ledger package is heavy; only init needs it here

    ledger_dir.mkdir(mode=0o700, exist_ok=True)
    ledger = DurableLedger.open(ledger_dir)
    try:
        result, _ = ledger.submit(Batch(timestamp_ns=time.time_ns(), accounts=tuple(accounts)))
        bad = [status for status in result.account_results if status != AccountStatus.created]
        if bad:
            raise InitError(f"ledger refused the system accounts: {sorted({s.name for s in bad})}")
        ledger.flush_sync()
    finally:
        ledger.close()


def _write_new_file(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), mode)  # exactly `mode`, whatever the umask
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _move_into_place(staging: Path, data_dir: Path) -> None:
    """rename(2) is atomic and may replace an empty directory, never a non-empty one."""
    _fsync_tree(staging)
    try:
        os.rename(staging, data_dir)
    except OSError as error:
        raise InitError(f"cannot create {data_dir}: {error.strerror}") from None
    fd = os.open(data_dir.absolute().parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Directory entries must be on disk before the rename publishes them."""
    for directory, _, _ in os.walk(root):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
