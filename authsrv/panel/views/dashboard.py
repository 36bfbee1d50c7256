"""The dashboard (being extended with live metrics)."""

from __future__ import annotations

from authsrv.panel.app import PanelApp
from authsrv.rest.context import ALL_ROLES


def register(panel: PanelApp) -> None:
    @panel.page("/", roles=ALL_ROLES)
    async def dashboard(request, op):
        return panel.render(request, op, "dashboard.html")
