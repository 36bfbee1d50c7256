"""Which authorization a reversal releases when field 90 names two (docs/contract.md, wire profile).

Field 90 is MTI + STAN + field 7 + acquirer: two acquirer systems sharing an acquirer id (or a STAN
counter that wrapped within the same second) produce two authorizations with the same field 90.
`make demo` runs two load generators at once and hit exactly this: a reversal for one card voided
another card's hold, and that card's clearing record then came in `late`.
"""

from __future__ import annotations

from tests.conftest import SEED_AMOUNT
from tests.isoclient import IsoClient, auth, next_ids, reversal_of
from tests.test_clearing import balance, solo  # noqa: F401


async def _approve(client, card: dict, *, stan: str, amount: int) -> dict:
    request = auth(card, amount=amount, cvc2=card["cvc2"], stan=stan)
    assert (await client.call(request))["39"] == "00"
    return request


async def test_reversal_releases_its_own_card_when_field_90_names_two(server, solo):
    first, second = solo[0], solo[1]
    client = await IsoClient.connect(server.iso_port)
    stan, _ = next_ids()
    mine = await _approve(client, first, stan=stan, amount=3000)
    other = await _approve(client, second, stan=stan, amount=5000)  # same field 90 identity, other RRN
    assert mine["37"] != other["37"]

    assert (await client.call(reversal_of(mine)))["39"] == "00"
    assert balance(server, first).available == SEED_AMOUNT  # released
    assert balance(server, second).available == SEED_AMOUNT - 5000  # untouched

    assert (await client.call(reversal_of(other)))["39"] == "00"
    assert balance(server, second).available == SEED_AMOUNT


async def test_reversal_matched_on_field_90_alone_must_be_for_the_same_card(server, solo):
    first, second = solo[2], solo[3]
    client = await IsoClient.connect(server.iso_port)
    stan, _ = next_ids()
    await _approve(client, first, stan=stan, amount=2000)
    other = await _approve(client, second, stan=stan, amount=4000)
    # A reversal with its own RRN (none of the originals') for the first card: field 90 alone names
    # the latest authorization, which is the second card's. Not ours: 25, nothing released.
    stray = reversal_of(other)
    _, stray["37"] = next_ids()
    stray["2"] = first["pan"]
    stray.pop("14", None)
    assert (await client.call(stray))["39"] == "25"
    assert balance(server, second).available == SEED_AMOUNT - 4000
    assert balance(server, first).available == SEED_AMOUNT - 2000
    # The same with the right card (field 90 and the PAN agree) still works when the RRN differs.
    _, fresh_rrn = next_ids()
    assert (await client.call({**reversal_of(other), "37": fresh_rrn}))["39"] == "00"
    assert balance(server, second).available == SEED_AMOUNT

