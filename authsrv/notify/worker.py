"""The delivery worker: schedules calls from the durable sources and delivers them, in the server.

Tasks (one nursery, started by `authsrv.app._run`):
- journal: records from `AuthJournal.listeners` (a bounded channel; the hot path only does a
  `send_nowait`), once the log is durable up to them, become delivery rows (`calls_of_record`);
- events: store events after the `events` cursor become rows (`calls_of_event`; a clearing's
  `transaction.cleared` event becomes the partner's status update);
- dispatch: due rows, first of their order key, at most `in_flight_max` at once, one HTTP try each;
- results: tries written back in batches (one store commit for many);
- upkeep: gauges, pruning of delivered rows.
See `authsrv/notify/__init__.py` for the crash windows.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import trio

from authsrv.hotpath.journal import AuthRecord
from authsrv.notify import outbox as outbox_rows
from authsrv.notify.calls import (
    CardInfo,
    PartnerCall,
    PartnerView,
    RecordLookups,
    UserInfo,
    calls_of_event,
    calls_of_record,
    recovered_record,
)
from authsrv.notify.outbox import Delivery, Outcome, OutboxStore, now_ms
from authsrv.notify.partner_http import PartnerClient

log = logging.getLogger("authsrv.notify")

JOURNAL_QUEUE_MAX = 10_000  # records waiting to be scheduled; past it, a catch-up scan of the journal
JOURNAL_BATCH_MAX = 1_000  # records scheduled per store commit
RECOVERY_RECORDS_MAX = 2_000_000  # journal records one catch-up scan may schedule
SKEW_NS_MIN = 5 * 10**9  # records reach the journal up to one ISO budget after their timestamp
EVENTS_PAGE = 500
EVENTS_POLL_S = 0.2
DISPATCH_POLL_S = 0.2  # rows made by other processes' paths (OTP, admin replay) are found this fast
RESULTS_BATCH_MAX = 256
UPKEEP_INTERVAL_S = 2.0
PRUNE_INTERVAL_S = 60.0
STORE_THREADS = 2
CLOSE_GRACE_S = 1.0
LOG_CURSOR = "log"
EVENTS_CURSOR = "events"


def backoff_ms(tries: int, *, initial_ms: int, max_s: int, rng: random.Random) -> int:
    """Exponential with jitter: try n waits initial * 2**(n-1), capped, times a draw in [0.5, 1]."""
    assert tries >= 1
    base = min(initial_ms * 2 ** min(tries - 1, 32), max_s * 1000)
    return max(1, int(base * rng.uniform(0.5, 1.0)))


def partner_views(config) -> dict[str, PartnerView]:
    return {name: PartnerView(balance_mode=partner.balance_mode, notify=frozenset(partner.notify),
                              has_api=bool(partner.api_url)) for name, partner in config.partners.items()}


class DeliveryWorker:
    """Owns the partner clients, the journal channel and the in-flight set."""

    def __init__(self, *, store, data_dir: Path, config, journal, index, ledger, metrics) -> None:
        self.outbox = OutboxStore(store)
        self._store = store
        self._config = config
        self._delivery = config.delivery
        self._journal = journal
        self._index = index
        self._ledger = ledger
        self._metrics = metrics
        self._views = partner_views(config)
        self._clients = {name: PartnerClient(name, partner.api_url, data_dir=data_dir,
                                             timeout_s=self._delivery.timeout_s)
                         for name, partner in config.partners.items() if partner.api_url}
        self._records_in, self._records_out = trio.open_memory_channel[AuthRecord](JOURNAL_QUEUE_MAX)
        self._results_in, self._results_out = trio.open_memory_channel[Outcome](self._delivery.in_flight_max)
        self._overflowed = False
        self._in_flight: set[int] = set()
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(STORE_THREADS)
        self._rng = random.Random()
        self._skew_ns = max(SKEW_NS_MIN, 2 * config.iso.budget_ms * 1_000_000)
        self._lookups = RecordLookups(card=self._card, partner=self._views.get, original=journal.get)

    # -- the hot-path side ----------------------------------------------------------------------

    def on_record(self, record: AuthRecord) -> None:
        """AuthJournal listener: never blocks, never raises into the hot path."""
        try:
            self._records_in.send_nowait(record)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._overflowed = True  # the catch-up scan of the journal finds it

    # -- running --------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._recover()
            if self._clients:  # no partner API, no call from a record: the hot path stays as it was
                self._journal.listeners.append(self.on_record)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._journal_loop)
                nursery.start_soon(self._events_loop)
                nursery.start_soon(self._results_loop)
                nursery.start_soon(self._upkeep_loop)
                nursery.start_soon(self._dispatch_loop, nursery)
                task_status.started(self)
        finally:
            if self.on_record in self._journal.listeners:
                self._journal.listeners.remove(self.on_record)
            with trio.move_on_after(CLOSE_GRACE_S) as scope:
                scope.shield = True
                for client in self._clients.values():
                    await client.close()

    async def _in_store(self, function, *args, **kwargs):
        return await trio.to_thread.run_sync(lambda: function(*args, **kwargs), limiter=self._limiter)

    def wake(self) -> None:
        self._wake.set()

    # -- the journal source ---------------------------------------------------------------------

    def _card(self, card_id: int) -> CardInfo | None:
        card = self._index.card_by_id(card_id) if self._index is not None else None
        if card is None:
            return None
        return CardInfo(card_id=card.card_id, user_id=card.customer_id, balance_id=card.balance_id,
                        partner=card.partner, pan_last4=card.pan_last4)

    async def _recover(self) -> None:
        """At start: schedule what the journal holds past the cursor (less a margin for skew)."""
        cursor = await self._in_store(self.outbox.cursor, LOG_CURSOR)
        if cursor == 0:  # first start with an outbox: from now on, not the past day of records
            await self._in_store(self.outbox.set_cursor, LOG_CURSOR, time.time_ns() - self._skew_ns)
            return
        scheduled = await self._catch_up(cursor, recovering=True)
        log.info("outbox: %d calls scheduled again from the journal after the cursor", scheduled)

    async def _catch_up(self, cursor_ns: int, *, recovering: bool) -> int:
        records = self._journal.records_since(cursor_ns - self._skew_ns, RECOVERY_RECORDS_MAX)
        if len(records) >= RECOVERY_RECORDS_MAX:
            log.warning("outbox: catch-up bounded at %d records; older ones are not scheduled",
                        RECOVERY_RECORDS_MAX)
        inserted = 0
        for start in range(0, len(records), JOURNAL_BATCH_MAX):
            chunk = records[start:start + JOURNAL_BATCH_MAX]
            if recovering:
                chunk = [recovered_record(record) for record in chunk]
            inserted += await self._schedule_records(chunk)
        return inserted

    async def _schedule_records(self, records: list[AuthRecord]) -> int:
        # Only what is on disk may be announced: the listener ran in the step that submitted each
        # record, so the log's last sequence now covers all of them.
        await self._ledger.wait_durable(self._ledger.last_seq)
        calls = [call for record in records for call in calls_of_record(record, self._lookups)]
        newest = max(record.timestamp_ns for record in records)
        inserted = await self._in_store(self.outbox.schedule, calls, tries_max=self._delivery.tries_max,
                                        cursor=(LOG_CURSOR, newest))
        if inserted:
            self._metrics.outbox_scheduled.inc(inserted)
            self.wake()
        return inserted

    async def _journal_loop(self) -> None:
        async for first in self._records_out:
            batch = [first]
            while len(batch) < JOURNAL_BATCH_MAX:
                try:
                    batch.append(self._records_out.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self._schedule_records(batch)
                if self._overflowed:
                    self._overflowed = False
                    log.warning("outbox: journal queue was full; catching up from the journal")
                    cursor = await self._in_store(self.outbox.cursor, LOG_CURSOR)
                    await self._catch_up(min(cursor, first.timestamp_ns), recovering=False)
            except Exception as error:  # a store that cannot write (full disk): the cursor did not move
                log.error("outbox: scheduling the calls of %d records failed (%s: %s); caught up from the "
                          "journal later", len(batch), type(error).__name__, error)
                self._overflowed = True
                await trio.sleep(EVENTS_POLL_S)

    # -- the events source ----------------------------------------------------------------------

    def _event_calls(self, after_id: int) -> tuple[list[PartnerCall], int]:
        events = self._store.events(after_id=after_id, limit=EVENTS_PAGE)
        calls = []
        for event in events:
            calls.extend(calls_of_event(event.id, event.partner, event.kind, event.body, event.idempotency_key,
                                        self._views.get(event.partner), self._user))
        last = events[-1].id if events else after_id
        if events:
            self.outbox.schedule(calls, tries_max=self._delivery.tries_max, cursor=(EVENTS_CURSOR, last))
        return calls, last

    def _user(self, user_id: int) -> UserInfo | None:
        user = self._store.get_user(user_id)
        if user is None:
            return None
        return UserInfo(user_id=user.id, email=user.email, first_name=user.first_name, last_name=user.last_name)

    async def _events_loop(self) -> None:
        cursor = await self._in_store(self.outbox.cursor, EVENTS_CURSOR)
        while True:
            try:
                calls, last = await self._in_store(self._event_calls, cursor)
            except Exception:  # a store hiccup: the cursor did not move, the next round retries
                log.exception("outbox: reading events failed")
                await trio.sleep(EVENTS_POLL_S)
                continue
            if calls:
                self._metrics.outbox_scheduled.inc(len(calls))
                self.wake()
            moved, cursor = last != cursor, last
            if not moved:
                await trio.sleep(EVENTS_POLL_S)

    # -- delivery -------------------------------------------------------------------------------

    async def _dispatch_loop(self, nursery: trio.Nursery) -> None:
        in_flight_max = self._delivery.in_flight_max
        while True:
            free = in_flight_max - len(self._in_flight)
            if free > 0:
                try:
                    due = await self._in_store(self.outbox.due, limit=free, exclude=tuple(self._in_flight))
                except Exception:
                    log.exception("outbox: reading due deliveries failed")
                    due = []
                for delivery in due:
                    self._in_flight.add(delivery.id)
                    nursery.start_soon(self._deliver, delivery)
            with trio.move_on_after(DISPATCH_POLL_S):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _deliver(self, delivery: Delivery) -> None:
        client = self._clients.get(delivery.partner)
        if client is None:
            answer_ok, status, error = False, 0, "partner has no api_url"
        else:
            answer = await client.send(delivery.method, delivery.path, delivery.body.encode(),
                                       delivery.idempotency_key)
            answer_ok, status, error = answer.ok, answer.status, answer.error
        wait_ms = 0 if answer_ok else backoff_ms(delivery.tries + 1, initial_ms=self._delivery.backoff_initial_ms,
                                                 max_s=self._delivery.backoff_max_s, rng=self._rng)
        if not answer_ok:
            log.info("outbox: %s %s to %s: try %d failed (%s)", delivery.kind, delivery.id, delivery.partner,
                     delivery.tries + 1, status or error[:60])
        await self._results_in.send(Outcome(delivery.id, answer_ok, status, error, now_ms() + wait_ms))

    async def _results_loop(self) -> None:
        async for first in self._results_out:
            batch = [first]
            while len(batch) < RESULTS_BATCH_MAX:
                try:
                    batch.append(self._results_out.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                died = await self._in_store(self.outbox.record, batch)
            except Exception:  # still pending in the store: tried again, with the same key
                log.exception("outbox: writing %d delivery results failed", len(batch))
                died = []
            else:
                for outcome in batch:
                    result = "delivered" if outcome.delivered else "retry"
                    self._metrics.outbox_deliveries.labels(result=result).inc()
                for delivery in died:
                    self._metrics.outbox_deliveries.labels(result="dead").inc()
                    log.warning("outbox: %s %d to %s is a dead letter after %d tries (last: %s)", delivery.kind,
                                delivery.id, delivery.partner, delivery.tries, delivery.last_error[:60] or "-")
            for outcome in batch:
                self._in_flight.discard(outcome.delivery_id)
            self.wake()

    # -- upkeep ---------------------------------------------------------------------------------

    async def _upkeep_loop(self) -> None:
        retention_ms = (self._config.duplicates.retention_hours + 24) * 3_600_000
        last_prune = time.monotonic()
        while True:
            try:
                counts = await self._in_store(self.outbox.counts)
                self._metrics.outbox_dead_letters.set(counts[outbox_rows.DEAD])
                self._metrics.outbox_pending.set(counts[outbox_rows.PENDING])
                if time.monotonic() - last_prune >= PRUNE_INTERVAL_S:
                    last_prune = time.monotonic()
                    # Past the journal's retention nothing can schedule these keys again.
                    await self._in_store(self.outbox.prune_delivered, older_than_ms=now_ms() - retention_ms)
            except Exception:
                log.exception("outbox: upkeep failed")
            await trio.sleep(UPKEEP_INTERVAL_S)


async def run_delivery(*, store, data_dir: Path, config, journal, index, ledger, metrics,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """`nursery.start(partial(run_delivery, ...))` in the server; returns when cancelled."""
    worker = DeliveryWorker(store=store, data_dir=data_dir, config=config, journal=journal, index=index,
                            ledger=ledger, metrics=metrics)
    await worker.run(task_status=task_status)
