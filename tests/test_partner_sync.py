"""Operators edit `[partners.NAME]` in authsrv.toml; the server makes the store follow at startup."""

from __future__ import annotations

from pathlib import Path

from authsrv.config import load_config
from authsrv.store.db import PartnerBalanceType, Store
from authsrv.store.partners import sync_partners


def test_changed_collateral_reaches_the_store(data_dir: Path) -> None:
    path = data_dir / "authsrv.toml"
    text = path.read_text()
    assert 'collateral = "deposit"' in text
    path.write_text(text.replace('collateral = "deposit"', 'collateral = "credit"', 1))
    with Store.open(data_dir) as store:
        assert sync_partners(store, load_config(data_dir)) == ["demo"]
        assert store.get_partner("demo").collateral == "credit"
        types = {(row.type, row.currency) for row in store.partner_balances("demo")}
        assert (PartnerBalanceType.credit, "EUR") in types  # the account the new collateral needs
        assert sync_partners(store, load_config(data_dir)) == []  # nothing left to change


def test_unchanged_config_changes_nothing(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        before = store.list_partners()
        assert sync_partners(store, load_config(data_dir)) == []
        assert store.list_partners() == before
