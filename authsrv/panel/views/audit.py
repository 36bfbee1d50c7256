"""The audit log (being extended with filters and CSV export)."""

from __future__ import annotations

from authsrv.panel.app import PanelApp
from authsrv.rest.context import ALL_ROLES
from authsrv.store.db import AuditQuery


def register(panel: PanelApp) -> None:
    @panel.page("/audit", roles=ALL_ROLES)
    async def audit(request, op):
        entries = await panel.ctx.in_thread(panel.store.audit_page, AuditQuery(), limit=100)
        return panel.render(request, op, "audit.html", entries=entries)
