"""`authsrv partner add --data DIR NAME`: a partner with its own client certificate.

Three places learn about the partner: `DIR/pki/NAME.crt/.key` (signed by the development CA,
subject CN = NAME, so the REST layer maps a verified certificate to the partner), a
`[partners.NAME]` table in authsrv.toml (its settings), and a `partners` row in the store (what
users, balances and ledger accounts refer to). Everything is checked before anything is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from authsrv import pki
from authsrv.config import (
    ConfigError,
    PartnerConfig,
    append_partner_config,
    load_config,
    valid_partner_name,
)
from authsrv.store.db import STORE_FILE_NAME, Store, StoreError

# File stems already taken in DIR/pki/: the CA, the server, and partner demo's `partner.crt`.
RESERVED_PARTNER_NAMES = frozenset({pki.CA_STEM, pki.SERVER_STEM, "partner"})


class PartnerError(Exception):
    """The partner cannot be added (bad or taken name, missing data directory)."""


def add_partner(data_dir: Path, name: str) -> None:
    data_dir = Path(data_dir)
    _check_name(name)
    pki_dir = data_dir / "pki"
    try:
        config = load_config(data_dir)
    except ConfigError as error:
        raise PartnerError(str(error)) from None
    if name in config.partners:
        raise PartnerError(f"partner {name!r} already exists in {data_dir / 'authsrv.toml'}")
    for suffix in (".crt", ".key"):
        if (pki_dir / f"{name}{suffix}").exists():
            raise PartnerError(f"{pki_dir / (name + suffix)} already exists")
    with _partner_store(data_dir, config) as store:
        if store.get_partner(name) is not None:
            raise PartnerError(f"partner {name!r} already exists in the store")
        settings = PartnerConfig()
        try:
            pki.issue_client_cert(pki_dir, name, name)
        except pki.PkiError as error:
            raise PartnerError(str(error)) from None
        append_partner_config(data_dir, name, settings)
        store.add_partner(name, balance_mode=settings.balance_mode, collateral=settings.collateral)
    print(f"added partner {name!r}")
    print(f"  client certificate {pki_dir / (name + '.crt')} (key {pki_dir / (name + '.key')})")
    print(f"  settings [partners.{name}] in {data_dir / 'authsrv.toml'}")
    # No probe of DIR/.lock here: taking it even briefly could make a starting server fail.
    print("  a running server loads the new partner when it restarts")


@contextlib.contextmanager
def _partner_store(data_dir: Path, config) -> Iterator[Store]:
    """The local store; on a cluster node the shard's, written through its stream. (Each node
    reads its own authsrv.toml and pki/: copy the new table and certificate to the other nodes.)"""
    if config.cluster is not None:
        from authsrv.cluster.session import shard_session

        with shard_session(data_dir, config) as state:
            yield state.store
        return
    try:
        store = Store.open(data_dir / STORE_FILE_NAME)
    except StoreError as error:
        raise PartnerError(str(error)) from None
    with store:
        yield store


def _check_name(name: str) -> None:
    if not valid_partner_name(name):
        raise PartnerError(f"partner name {name!r} must be 1 to 32 of a-z, 0-9, '_' and '-'")
    if name in RESERVED_PARTNER_NAMES:
        raise PartnerError(f"partner name {name!r} is reserved (its certificate file is taken)")


def sync_partners(store: Store, config) -> list[str]:
    """Make the store follow `[partners.NAME]` in authsrv.toml (what operators edit), at startup.

    A partner only in the config gets its row; a changed `balance_mode` or `collateral` is copied,
    and the accounts the new collateral needs are allocated in every currency the partner already
    uses (the server creates missing ledger accounts right after). Returns the partners changed."""
    changed = []
    for name, settings in config.partners.items():
        row = store.get_partner(name)
        if row is None:
            store.add_partner(name, balance_mode=settings.balance_mode, collateral=settings.collateral)
            changed.append(name)
            continue
        if (row.balance_mode, row.collateral) == (settings.balance_mode, settings.collateral):
            continue
        with store.transaction():
            store.set_partner_modes(name, balance_mode=settings.balance_mode, collateral=settings.collateral)
            for currency in sorted({balance.currency for balance in store.partner_balances(name)}):
                store.ensure_partner_accounts(name, currency)
        changed.append(name)
    return changed
