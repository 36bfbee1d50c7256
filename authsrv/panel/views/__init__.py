"""The panel's pages, one module per area; each offers `register(panel)`."""

from __future__ import annotations

import importlib

# In menu order; each module registers its own pages and actions on the PanelApp.
MODULES = (
    "session",  # login, logout
    "dashboard",
    "users",
    "kyc",
    "cards",
    "transactions",
    "balances",  # partner balances, balance summary
    "fees",
    "clearing",
    "outbox",
    "fx",
    "admins",
    "audit",
)


def register_all(panel) -> None:
    for name in MODULES:
        importlib.import_module(f"authsrv.panel.views.{name}").register(panel)
