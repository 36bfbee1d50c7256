"""uuid5_text is uuid.uuid5, faster: transaction ids partners already hold must not change."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from authsrv.clearing.cleared import FORCED_NAMESPACE
from authsrv.hotpath.external import KEY_NAMESPACE, TRANSACTION_NAMESPACE
from authsrv.uuids import uuid5_text


@given(namespace=st.uuids() | st.sampled_from([KEY_NAMESPACE, TRANSACTION_NAMESPACE, FORCED_NAMESPACE]),
       name=st.text())
def test_uuid5_text_is_the_standard_library_s_uuid5(namespace: uuid.UUID, name: str) -> None:
    assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name))


def test_a_known_transaction_id_is_unchanged() -> None:
    assert uuid5_text(TRANSACTION_NAMESPACE, "0200:000000000001:123456") == "7922caa8-21f1-5109-91fe-36154969e443"
