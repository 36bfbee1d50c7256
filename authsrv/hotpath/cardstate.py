"""Card changes the hot path makes itself (the wrong-PIN counter and the reason-6 lock).

They take effect in the in-memory index at once, so the very next message sees them, and reach
SQLite from a worker thread in order: a commit there costs an fsync, which must not stall every
other authorization on the event loop.
"""

from __future__ import annotations

import logging
import sqlite3

import trio

from authsrv.store.index import CardState, CardStatus

log = logging.getLogger("authsrv.hotpath")

WRITES_QUEUED_MAX = 10_000  # beyond this the hot path writes synchronously (slow, but nothing is lost)
STORE_RETRY_S = 1.0  # a store that cannot write (full disk) is tried again this often, in order


class CardStateWriter:
    def __init__(self, store) -> None:
        self._store = store
        self._send, self._receive = trio.open_memory_channel(WRITES_QUEUED_MAX)
        self.drained = trio.Event()  # set once `run` has written everything queued before close()

    def wrong_pin(self, card: CardState) -> int:
        card.wrong_pin_count += 1
        self._save(card)
        return card.wrong_pin_count

    def right_pin(self, card: CardState) -> None:
        card.wrong_pin_count = 0
        self._save(card)

    def lock(self, card: CardState, reason: int) -> None:
        assert card.status is not CardStatus.removed
        card.status, card.lock_reason = CardStatus.locked, reason
        self._save(card)

    def _save(self, card: CardState) -> None:
        write = (card.card_id, card.wrong_pin_count, card.status, card.lock_reason)
        try:
            self._send.send_nowait(write)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._store.save_pin_state(*write)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write queued changes in order until the channel is closed by `close()`."""
        task_status.started()
        async with self._receive:
            async for write in self._receive:
                await self._save_retrying(write)
        self.drained.set()

    async def _save_retrying(self, write: tuple) -> None:
        """One queued change, tried again until the store takes it (SQLite on a full disk: "database
        or disk is full"): it is in effect in memory already, and the ones behind it keep their order.
        Bounded by the disk coming back, or by the cancellation at shutdown."""
        failures = 0
        while True:
            try:
                await trio.to_thread.run_sync(self._store.save_pin_state, *write)
            except (sqlite3.Error, OSError) as error:
                if not failures:
                    log.error("card state not saved to the store, tried again every %.0f s: %s", STORE_RETRY_S, error)
                failures += 1
                await trio.sleep(STORE_RETRY_S)
                continue
            if failures:
                log.warning("card state saved to the store again after %d failed tries", failures)
            return

    def close(self) -> None:
        """No more hot-path writes: `run` drains what is queued and returns."""
        self._send.close()
