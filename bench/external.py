"""An external-balance partner for `make demo` and `make bench` (issue 5; docs/contract.md, partner
settings and benchmark output).

The steps an operator takes, driven through the same commands:
- `authsrv partner add --data DIR NAME`, then its `[partners.NAME]` table is rewritten to
  `balance_mode = "external"` with `api_url` pointing at the partner simulator;
- `authsrv seed --partner NAME --unlinked`: users, balances and cards here, no money (it lives at the
  partner), and the partner is not told (refused without `--unlinked`: the next step links them);
- the partner simulator runs as its own process (`python -m simulators.partner`) and learns each
  seeded balance with its amount through its control API (`PUT /_sim/balances/{user}/{balance}`),
  which skips the simulated latency and faults, so linking costs the same in every scenario.

After the load, `/metrics` says what the hot path did with the partner: calls by result
(`authsrv_external_calls_total`), their latency (`authsrv_external_call_seconds`) and stand-in
decisions (`authsrv_stand_in_total`).
"""

from __future__ import annotations

import functools
import math
import sys
import urllib.request
from pathlib import Path

import attrs
import httpx
import msgspec
import trio
from prometheus_client.parser import text_string_to_metric_families

from authsrv.config import PartnerConfig, render_partner_table
from simulators.network.mix import Amounts
from simulators.network.target import ChildProcess, TargetError, authsrv_command, run_cli

LINK_CONCURRENCY = 16  # control-API calls in flight while linking (the simulator is one trio process)
LINK_BALANCES_MAX = 1_000_000  # the simulator's own BALANCES_MAX
LINK_TIMEOUT_S = 10.0  # per control-API call
CARD_LINES_MAX = 2_000_000
SIM_READY_TIMEOUT_S = 30.0
METRICS_TIMEOUT_S = 5.0
METRICS_SIZE_MAX = 8 * 1024 * 1024


def collateral_per_user(users: int, balance_minor: int) -> int:
    """`authsrv seed --amount` for an external partner's users: the deposit it funds (users x amount)
    covers every balance AND one over-balance attempt of the mix in flight. The collateral is held
    before the partner is asked, so an over-balance request (Amounts.over_balance_minor) holds that
    much of the deposit until the partner's 422: with a deposit of exactly users x balance, the
    authorizations arriving meanwhile would find it empty and get 51 (insufficient collateral)."""
    assert users > 0 and balance_minor > 0
    return balance_minor + -(-Amounts().over_balance_minor // users)


class CardIds(msgspec.Struct, frozen=True, rename="camel"):
    """The part of a cards-file line the partner needs (the file has more: unknown keys are ignored)."""

    customer_id: int
    balance_id: int
    currency: str


def sim_command(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "simulators.partner", "--port", str(port), "--log-level", "WARNING", *args]


def start_partner_sim(port: int, log_path: Path, args: tuple[str, ...], name: str = "partner simulator") -> ChildProcess:
    """The partner simulator on 127.0.0.1:`port`, returned once its control API answers."""
    sim = ChildProcess.start(name, sim_command(port, *args), log_path)
    try:
        sim.wait_http_ready(f"http://127.0.0.1:{port}/_sim/stats", timeout_s=SIM_READY_TIMEOUT_S)
    except BaseException:
        sim.stop(timeout_s=5.0)
        raise
    return sim


def replace_partner_table(text: str, name: str, partner: PartnerConfig) -> str:
    """`text` (authsrv.toml) with the `[partners.NAME]` table replaced: from its header to the next
    table header or the end. Everything else is kept as it is."""
    header = f"[partners.{name}]"
    lines = text.splitlines(keepends=True)
    starts = [index for index, line in enumerate(lines) if line.strip() == header]
    if len(starts) != 1:
        raise TargetError(f"authsrv.toml has {len(starts)} {header} tables, expected 1")
    start = starts[0]
    end = next((index for index in range(start + 1, len(lines)) if lines[index].lstrip().startswith("[")),
               len(lines))  # fmt: skip
    table = render_partner_table(name, partner)
    if end < len(lines):
        table += "\n"
    return "".join(lines[:start]) + table + "".join(lines[end:])


def add_external_partner(data: Path, name: str, api_url: str, log_path: Path, **settings: object) -> None:
    """`authsrv partner add`, then its table says external with this api_url (what an operator edits)."""
    run_cli(authsrv_command("partner", "add", "--data", str(data), name), log_path=log_path)
    path = data / "authsrv.toml"
    partner = PartnerConfig(balance_mode="external", api_url=api_url, **settings)
    path.write_text(replace_partner_table(path.read_text(), name, partner))


def seed_partner(data: Path, partner: str, *, users: int, cards_per_user: int, amount_minor: int, out: Path,
                 log_path: Path) -> Path:  # fmt: skip
    run_cli(authsrv_command("seed", "--data", str(data), "--partner", partner, "--users", str(users),
                            "--cards-per-user", str(cards_per_user), "--amount", str(amount_minor),
                            "--out", str(out), "--quiet", "--unlinked"), log_path=log_path)  # fmt: skip
    if not out.is_file():
        raise TargetError(f"`authsrv seed --partner {partner}` wrote no cards file at {out}")
    return out


def balances_of(cards_path: Path) -> list[CardIds]:
    """Each balance of a cards file once (a user with K cards has one balance)."""
    decoder = msgspec.json.Decoder(CardIds)
    seen: dict[int, CardIds] = {}
    with cards_path.open("rb") as file:
        for number, line in enumerate(file):
            if number >= CARD_LINES_MAX:
                raise TargetError(f"{cards_path}: more than {CARD_LINES_MAX} lines")
            if line.strip():
                ids = decoder.decode(line)
                seen.setdefault(ids.balance_id, ids)
    if len(seen) > LINK_BALANCES_MAX:
        raise TargetError(f"{len(seen)} balances: the partner simulator keeps at most {LINK_BALANCES_MAX}")
    return list(seen.values())


async def _link_all(url: str, balances: list[CardIds], amount_minor: int) -> None:
    limiter = trio.CapacityLimiter(LINK_CONCURRENCY)
    failures: list[str] = []

    async def link(client: httpx.AsyncClient, ids: CardIds) -> None:
        async with limiter:
            reply = await client.put(f"/_sim/balances/{ids.customer_id}/{ids.balance_id}",
                                     json={"amount": amount_minor, "currency": ids.currency})  # fmt: skip
        if reply.status_code != 200 and len(failures) < 10:
            failures.append(f"balance {ids.balance_id}: {reply.status_code} {reply.text[:200]}")

    limits = httpx.Limits(max_connections=LINK_CONCURRENCY, max_keepalive_connections=LINK_CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=LINK_TIMEOUT_S, trust_env=False) as client:
        async with trio.open_nursery() as nursery:
            for ids in balances:  # bounded: LINK_BALANCES_MAX, LINK_CONCURRENCY at a time
                nursery.start_soon(link, client, ids)
    if failures:
        raise TargetError("the partner simulator refused balances: " + "; ".join(failures))


def link_balances(url: str, cards_path: Path, amount_minor: int) -> int:
    """Tell the partner simulator at `url` every balance of `cards_path`, each holding `amount_minor`.
    Returns the number of balances linked."""
    balances = balances_of(cards_path)
    try:
        trio.run(functools.partial(_link_all, url.rstrip("/"), balances, amount_minor))
    except httpx.HTTPError as error:
        raise TargetError(f"linking balances at {url}: {type(error).__name__}: {error}") from None
    return len(balances)


# -- what /metrics says about the partner ------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ExternalFigures:
    """The hot path's calls to one partner, from authsrv's /metrics (cumulative since start)."""

    partner: str
    calls: dict[str, int]  # result (approved, declined, timed_out, failed) -> calls
    stand_in: dict[str, int]  # decision (approve, decline) -> count
    seconds_count: int
    seconds_sum: float
    p50_ms_max: float | None  # upper bound of the histogram bucket holding the median (None: no calls)
    p99_ms_max: float | None

    @property
    def mean_ms(self) -> float | None:
        return self.seconds_sum / self.seconds_count * 1000 if self.seconds_count else None

    def render(self) -> str:
        calls = "  ".join(f"{result}: {count}" for result, count in sorted(self.calls.items())) or "none"
        stand_in = "  ".join(f"{decision}: {count}" for decision, count in sorted(self.stand_in.items())) or "none"
        latency = (f"mean {self.mean_ms:.2f} ms, p50 <= {_ms(self.p50_ms_max)}, p99 <= {_ms(self.p99_ms_max)}"
                   if self.seconds_count else "no calls")  # fmt: skip
        return (f"partner {self.partner}: external calls {sum(self.calls.values())} ({calls});"
                f" call latency {latency}; stand-in {stand_in}")  # fmt: skip


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return "+Inf" if math.isinf(value) else f"{value:g} ms"


def scrape_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=METRICS_TIMEOUT_S) as response:
        return response.read(METRICS_SIZE_MAX).decode("utf-8", errors="replace")


def external_figures(metrics_text: str, partner: str) -> ExternalFigures:
    calls: dict[str, int] = {}
    stand_in: dict[str, int] = {}
    buckets: list[tuple[float, float]] = []
    count, total = 0, 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.labels.get("partner") != partner:
                continue
            if sample.name == "authsrv_external_calls_total":
                calls[sample.labels["result"]] = int(sample.value)
            elif sample.name == "authsrv_stand_in_total":
                stand_in[sample.labels["decision"]] = int(sample.value)
            elif sample.name == "authsrv_external_call_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name == "authsrv_external_call_seconds_count":
                count = int(sample.value)
            elif sample.name == "authsrv_external_call_seconds_sum":
                total = sample.value
    buckets.sort()
    return ExternalFigures(partner=partner, calls=calls, stand_in=stand_in, seconds_count=count, seconds_sum=total,
                           p50_ms_max=_bucket_bound(buckets, count, 0.5),
                           p99_ms_max=_bucket_bound(buckets, count, 0.99))  # fmt: skip


def _bucket_bound(buckets: list[tuple[float, float]], count: int, quantile: float) -> float | None:
    """Upper bound (ms) of the first cumulative bucket holding `quantile` of the observations."""
    if not count:
        return None
    for upper_s, cumulative in buckets:
        if cumulative >= quantile * count:
            return upper_s * 1000
    return math.inf
