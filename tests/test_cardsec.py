"""Card security primitives: published test vectors, properties, invalid inputs, key files."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from authsrv import cardsec
from authsrv.cardsec import (
    CardKeys,
    CardSecurityError,
    KeyFileError,
    PanVault,
    cvc2,
    cvv,
    decrypt_pin_block,
    encrypt_pin_block,
    generate_pan,
    luhn_check_digit,
    luhn_valid,
    mask_pan,
    pin_block_decode,
    pin_block_encode,
    pvv,
    verify_pin,
)

PAN = "5355220000001234"  # the demo BIN, valid Luhn
assert luhn_valid(PAN)

pins = st.text(alphabet="0123456789", min_size=4, max_size=12)
pans = st.builds(
    generate_pan,
    st.sampled_from(["535522", "411111", "40000012"]),
    st.integers(min_value=0, max_value=10**7 - 1),
    st.sampled_from([16, 19]),
)


# --------------------------------------------------------------------------------------------
# Luhn


@pytest.mark.parametrize(
    "pan",
    ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "79927398713"],
)
def test_luhn_valid_known_numbers(pan: str) -> None:
    assert luhn_valid(pan)
    assert luhn_check_digit(pan[:-1]) == pan[-1]


@pytest.mark.parametrize(
    "pan", ["4111111111111112", "79927398710", "", "4", "41111111111a1111", "４１１１"]
)
def test_luhn_invalid(pan: str) -> None:
    assert not luhn_valid(pan)


def test_luhn_check_digit_rejects_non_digits() -> None:
    with pytest.raises(CardSecurityError):
        luhn_check_digit("12a4")
    with pytest.raises(CardSecurityError):
        luhn_check_digit("")


@given(pans, st.integers(min_value=0, max_value=15), st.integers(min_value=1, max_value=9))
def test_luhn_detects_every_single_digit_error(pan: str, position: int, delta: int) -> None:
    digit = (int(pan[position]) + delta) % 10
    altered = pan[:position] + str(digit) + pan[position + 1 :]
    assert luhn_valid(pan)
    assert not luhn_valid(altered)


def test_generate_pan_layout() -> None:
    body = "535522000000123"
    assert generate_pan("535522", 123, 16) == body + luhn_check_digit(body)
    pan = generate_pan("535522", 10**9 - 1, 16)
    assert pan.startswith("535522999999999") and len(pan) == 16 and luhn_valid(pan)
    with pytest.raises(CardSecurityError):
        generate_pan("535522", 10**9, 16)  # does not fit in 9 account digits
    with pytest.raises(CardSecurityError):
        generate_pan("535522", -1)
    with pytest.raises(CardSecurityError):
        generate_pan("53552", 1)
    with pytest.raises(CardSecurityError):
        generate_pan("535522", 1, 20)


def test_mask_pan() -> None:
    assert mask_pan("5355221234561234") == "535522******1234"
    assert mask_pan("5355221234567890123") == "535522*********0123"
    assert mask_pan("1234") == "****"


# --------------------------------------------------------------------------------------------
# CVV / CVC2

CVK_TEST = bytes.fromhex("0123456789ABCDEF" "FEDCBA9876543210")


# The classic CVV test data (CVK A 0123456789ABCDEF, CVK B FEDCBA9876543210), as published in
# the Chinese bank-card specification's CVV chapter and reproduced e.g. at
# http://bbs.pfan.cn/post/166149.html and http://fsou.com/html/text/chl/848/84828_4.html.
@pytest.mark.parametrize(
    ("pan", "expiry", "service_code", "expected"),
    [
        ("4123456789012", "8701", "101", "370"),
        ("4999988887777", "9105", "111", "649"),
        ("4666655554444", "9206", "120", "821"),
        ("4333322221111", "9307", "141", "697"),
        ("4123456789012345", "8701", "101", "561"),
        ("4999988887777000", "9105", "111", "245"),
        ("4666655554444111", "9206", "120", "664"),
        ("4333322221111222", "9307", "141", "382"),
        # Worked example with every intermediate value, service code 111
        # (topic.alibabacloud.com "algorithm generation 7: CVN"): result 856.
        ("4123456789012345", "8701", "111", "856"),
    ],
)
def test_cvv_published_vectors(pan: str, expiry: str, service_code: str, expected: str) -> None:
    assert cvv(pan, expiry, service_code, CVK_TEST) == expected


def test_cvv_vector_from_psec() -> None:
    # knovichikhin/psec tests/test_cvv.py: CVK 9999...8888..., PAN 2222222222222222.
    key = bytes.fromhex("9999999999999999" "8888888888888888")
    assert cvv("2222222222222222", "3333", "111", key) == "361"


def test_cvv_intermediate_values_match_worked_example() -> None:
    # The worked example's first step: DES(block 1) under key A = B76ADDCE71CCC6BE.
    key_a = CVK_TEST[:8]
    des = Cipher(TripleDES(key_a * 3), modes.ECB()).encryptor()
    assert des.update(bytes.fromhex("4123456789012345")).hex().upper() == "B76ADDCE71CCC6BE"


@given(pans, st.from_regex(r"[0-9]{2}(0[1-9]|1[0-2])", fullmatch=True))
@settings(max_examples=50)
def test_cvc2_is_cvv_with_service_code_000(pan: str, expiry: str) -> None:
    keys_cvk = CVK_TEST
    value = cvc2(pan, expiry, keys_cvk)
    assert value == cvv(pan, expiry, "000", keys_cvk)
    assert len(value) == 3 and value.isdigit()


@pytest.mark.parametrize(
    ("pan", "expiry", "service_code", "key"),
    [
        ("41234567890", "8701", "101", CVK_TEST),  # PAN too short
        ("41234567890123456789", "8701", "101", CVK_TEST),  # PAN too long
        ("412345678901234X", "8701", "101", CVK_TEST),
        ("4123456789012345", "870", "101", CVK_TEST),
        ("4123456789012345", "87A1", "101", CVK_TEST),
        ("4123456789012345", "8701", "10", CVK_TEST),
        ("4123456789012345", "8701", "101", CVK_TEST[:8]),  # single-length key
    ],
)
def test_cvv_rejects_bad_input(pan: str, expiry: str, service_code: str, key: bytes) -> None:
    with pytest.raises(CardSecurityError) as raised:
        cvv(pan, expiry, service_code, key)
    assert pan not in str(raised.value)


# --------------------------------------------------------------------------------------------
# PVV

PVK_TEST = bytes.fromhex("0123456789ABCDEF" "FEDCBA9876543210")


# knovichikhin/psec tests/test_pin.py (generate_visa_pvv), PVK 0123456789ABCDEFFEDCBA9876543210.
@pytest.mark.parametrize(
    ("pvki", "pin", "pan", "expected"),
    [
        (1, "4524", "1122334455667788", "8523"),
        (2, "1912", "1122334455667788", "3244"),
        (1, "0570", "1122334455667718", "3144"),
        (1, "8299", "1122334455667708", "4422"),
    ],
)
def test_pvv_published_vectors(pvki: int, pin: str, pan: str, expected: str) -> None:
    assert pvv(pan, pin, PVK_TEST, pvki) == expected
    assert verify_pin(pan, pin, expected, PVK_TEST, pvki)


def test_verify_pin_rejects_wrong_pin_and_wrong_pvv() -> None:
    stored = pvv(PAN, "2468", PVK_TEST)
    assert verify_pin(PAN, "2468", stored, PVK_TEST)
    assert not verify_pin(PAN, "2469", stored, PVK_TEST)
    assert not verify_pin(PAN, "2468", stored, PVK_TEST, pvki=2)
    assert not verify_pin(PAN, "2468", "0000" if stored != "0000" else "1111", PVK_TEST)


def test_pvv_uses_only_the_first_four_pin_digits() -> None:
    # A property of the Visa method (documented limitation): the TSP holds 4 PIN digits.
    assert pvv(PAN, "123456", PVK_TEST) == pvv(PAN, "1234", PVK_TEST)


@pytest.mark.parametrize("pin", ["123", "1234567890123", "12a4", ""])
def test_pvv_rejects_bad_pin(pin: str) -> None:
    with pytest.raises(CardSecurityError) as raised:
        pvv(PAN, pin, PVK_TEST)
    assert PAN not in str(raised.value)


def test_pvv_rejects_bad_pvki_and_key() -> None:
    with pytest.raises(CardSecurityError):
        pvv(PAN, "1234", PVK_TEST, pvki=10)
    with pytest.raises(CardSecurityError):
        pvv(PAN, "1234", PVK_TEST[:8])


# --------------------------------------------------------------------------------------------
# ISO 9564 format 0 PIN blocks


# knovichikhin/psec tests/test_pinblock.py (encode/decode_pinblock_iso_0).
@pytest.mark.parametrize(
    ("pin", "pan", "block"),
    [
        ("1234", "5555555551234567", "041261AAAAEDCBA9"),
        ("123456789", "5555555551234567", "091261032D8DCBA9"),
        ("1234567890", "5555555551234567", "0A1261032D82CBA9"),
        ("123456789012", "5555555551234567", "0C1261032D8226A9"),
    ],
)
def test_pin_block_published_vectors(pin: str, pan: str, block: str) -> None:
    assert pin_block_encode(pin, pan).hex().upper() == block
    assert pin_block_decode(bytes.fromhex(block), pan) == pin


@pytest.mark.parametrize(
    ("block", "why"),
    [
        ("241261AAAAEDCBA9", "control field 2 (format 2)"),
        ("141261AAAAEDCBA9", "control field 1"),
        ("0F1261AAAAEDCBA9", "PIN length 15"),
        ("021261AAAAEDCBA9", "PIN length 2"),
        ("031261AAAAEDCBA9", "PIN length 3"),
        ("0D1261AAAAEDCBA9", "PIN length 13"),
        ("041261AAAAEDCBAA", "filler not all F"),
        ("051261AAAAEDCBA9", "PIN digit is F"),
        ("04A261AAAAEDCBA9", "PIN digit is a letter"),
        ("041261AAAAEDCB", "7 bytes"),
        ("041261AAAAEDCBA900", "9 bytes"),
        ("", "empty"),
    ],
)
def test_pin_block_decode_rejects_invalid_blocks(block: str, why: str) -> None:
    assert pin_block_decode(bytes.fromhex(block), "5555555551234567") is None, why


def test_pin_block_decode_with_wrong_pan_is_none() -> None:
    block = pin_block_encode("1234", "5555555551234567")
    # A PAN differing in the digits that overlap the filler breaks the filler.
    assert pin_block_decode(block, "5555555551234999") is None


@pytest.mark.parametrize("pin", ["123", "1234567890123", "12 4", "１２３４"])
def test_pin_block_encode_rejects_bad_pin(pin: str) -> None:
    with pytest.raises(CardSecurityError):
        pin_block_encode(pin, PAN)


def test_pin_block_short_pan_is_left_padded() -> None:
    # A 12-digit PAN has 11 digits without its check digit: the 12-digit PAN field is zero-padded.
    pan = generate_pan("535522", 12345, 12)
    block = pin_block_encode("1234", pan)
    expected = int("041234FFFFFFFFFF", 16) ^ int("0000" + "0" + pan[:-1], 16)
    assert block == expected.to_bytes(8, "big")
    assert pin_block_decode(block, pan) == "1234"


@given(pins, pans)
@settings(max_examples=100)
def test_pin_block_encrypt_decrypt_round_trip(pin: str, pan: str) -> None:
    zpk = bytes.fromhex("0123456789ABCDEF" "FEDCBA9876543210")
    encrypted = encrypt_pin_block(pin, pan, zpk)
    assert len(encrypted) == 8
    assert encrypted != pin_block_encode(pin, pan)
    assert decrypt_pin_block(encrypted, pan, zpk) == pin


def test_encrypt_pin_block_is_two_key_3des_ede() -> None:
    # Independent construction: E(K1) D(K2) E(K1) with single-DES contexts.
    zpk = bytes.fromhex("0123456789ABCDEF" "FEDCBA9876543210")
    k1, k2 = zpk[:8], zpk[8:]
    clear = pin_block_encode("1234", PAN)
    step = Cipher(TripleDES(k1 * 3), modes.ECB()).encryptor().update(clear)
    step = Cipher(TripleDES(k2 * 3), modes.ECB()).decryptor().update(step)
    step = Cipher(TripleDES(k1 * 3), modes.ECB()).encryptor().update(step)
    assert encrypt_pin_block("1234", PAN, zpk) == step


def test_decrypt_pin_block_wrong_key_or_length() -> None:
    zpk = bytes.fromhex("0123456789ABCDEF" "FEDCBA9876543210")
    other = bytes.fromhex("1111111111111111" "2222222222222222")
    encrypted = encrypt_pin_block("1234", PAN, zpk)
    assert decrypt_pin_block(encrypted, PAN, other) != "1234"
    assert decrypt_pin_block(encrypted[:7], PAN, zpk) is None
    with pytest.raises(CardSecurityError):
        decrypt_pin_block(encrypted, PAN, zpk[:8])


# --------------------------------------------------------------------------------------------
# PAN vault


def test_pan_vault_round_trip_and_random_nonce() -> None:
    vault = PanVault(CardKeys.generate())
    first, second = vault.encrypt(PAN), vault.encrypt(PAN)
    assert first != second  # fresh nonce each time
    assert PAN.encode() not in first
    assert vault.decrypt(first) == vault.decrypt(second) == PAN


def test_pan_vault_rejects_tampering_and_other_keys() -> None:
    vault = PanVault(CardKeys.generate())
    blob = bytearray(vault.encrypt(PAN))
    blob[-1] ^= 1
    with pytest.raises(CardSecurityError) as raised:
        vault.decrypt(bytes(blob))
    assert PAN not in str(raised.value)
    with pytest.raises(CardSecurityError):
        PanVault(CardKeys.generate()).decrypt(vault.encrypt(PAN))
    with pytest.raises(CardSecurityError):
        vault.decrypt(b"short")


def test_pan_vault_index_is_truncated_hmac_sha256() -> None:
    keys = CardKeys.generate()
    vault = PanVault(keys)
    expected = hmac.new(keys.index_key, PAN.encode(), hashlib.sha256).digest()[:16]
    assert vault.index(PAN) == expected
    assert vault.index(PAN) == vault.index(PAN)
    assert vault.index(PAN) != vault.index(generate_pan("535522", 2))
    assert PanVault(CardKeys.generate()).index(PAN) != expected


def test_hot_path_costs_are_microseconds() -> None:
    # Loose bound (100 us) so a busy CI machine does not fail it; measured ~1-4 us each.
    keys = CardKeys.generate()
    vault = PanVault(keys)
    stored_pvv = pvv(PAN, "1234", keys.pvk)
    encrypted = encrypt_pin_block("1234", PAN, keys.zpk)
    calls = {
        "index": lambda: vault.index(PAN),
        "cvc2": lambda: cvc2(PAN, "2812", keys.cvk),
        "verify_pin": lambda: verify_pin(PAN, "1234", stored_pvv, keys.pvk),
        "decrypt_pin_block": lambda: decrypt_pin_block(encrypted, PAN, keys.zpk),
    }
    for name, call in calls.items():
        call()
        start = time.perf_counter()
        for _ in range(2000):
            call()
        cost_us = (time.perf_counter() - start) / 2000 * 1e6
        assert cost_us < 100, (name, cost_us)


# --------------------------------------------------------------------------------------------
# Keys and key files


def _odd_parity(key: bytes) -> bool:
    return all(bin(byte).count("1") % 2 == 1 for byte in key)


def test_generated_keys_have_right_sizes_and_parity() -> None:
    keys = CardKeys.generate()
    assert len(keys.pan_key) == 32 and len(keys.index_key) == 32
    for key in (keys.cvk, keys.pvk, keys.zpk):
        assert len(key) == 16 and _odd_parity(key) and key[:8] != key[8:]
    assert CardKeys.generate() != keys


def test_card_keys_repr_hides_secrets() -> None:
    keys = CardKeys.generate()
    text = repr(keys) + str(keys)
    for key in (keys.pan_key, keys.index_key, keys.cvk, keys.pvk, keys.zpk):
        assert key.hex() not in text.lower()
        assert key.hex()[:8] not in text.lower()
    assert "PanVault(<secrets hidden>)" == repr(PanVault(keys))


def test_card_keys_reject_wrong_lengths() -> None:
    keys = CardKeys.generate()
    with pytest.raises(CardSecurityError):
        CardKeys(keys.pan_key, keys.index_key, keys.cvk, keys.pvk, keys.zpk[:8])


def test_key_files_round_trip_with_private_modes(tmp_path: Path) -> None:
    keys = CardKeys.generate()
    keys_dir = tmp_path / "keys"
    keys.write(keys_dir)
    assert stat.S_IMODE(os.stat(keys_dir).st_mode) == 0o700
    names = sorted(p.name for p in keys_dir.iterdir())
    assert names == ["cvk.hex", "index.key", "pan.key", "pvk.hex", "zpk.hex"]
    for name in names:
        assert stat.S_IMODE(os.stat(keys_dir / name).st_mode) == 0o600
    zpk_text = (keys_dir / "zpk.hex").read_bytes()
    assert len(zpk_text) == 33 and zpk_text.endswith(b"\n")
    assert bytes.fromhex(zpk_text[:32].decode()) == keys.zpk
    assert (keys_dir / "pan.key").read_text().strip() == keys.pan_key.hex().upper()
    assert CardKeys.load(keys_dir) == keys


def test_key_files_are_never_overwritten(tmp_path: Path) -> None:
    CardKeys.generate().write(tmp_path / "keys")
    with pytest.raises(FileExistsError):
        CardKeys.generate().write(tmp_path / "keys")


def test_load_accepts_lower_case_and_missing_newline(tmp_path: Path) -> None:
    keys = CardKeys.generate()
    keys.write(tmp_path / "keys")
    zpk_path = tmp_path / "keys" / "zpk.hex"
    zpk_path.write_text(keys.zpk.hex())  # lower case, no newline
    assert CardKeys.load(tmp_path / "keys").zpk == keys.zpk


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("0123", "too short"),
        ("XY" * 16 + "\n", "not hex"),
        ("00" * 17 + "\n", "too long"),
        ("", "empty"),
    ],
)
def test_load_rejects_malformed_key_file(tmp_path: Path, content: str, why: str) -> None:
    keys = CardKeys.generate()
    keys.write(tmp_path / "keys")
    (tmp_path / "keys" / "zpk.hex").write_text(content)
    with pytest.raises(KeyFileError) as raised:
        CardKeys.load(tmp_path / "keys")
    assert "zpk.hex" in str(raised.value), why


def test_load_rejects_missing_file_and_permissive_modes(tmp_path: Path) -> None:
    keys = CardKeys.generate()
    keys_dir = tmp_path / "keys"
    keys.write(keys_dir)
    os.chmod(keys_dir / "cvk.hex", 0o644)
    with pytest.raises(KeyFileError) as raised:
        CardKeys.load(keys_dir)
    assert "cvk.hex" in str(raised.value) and keys.cvk.hex() not in str(raised.value).lower()
    os.chmod(keys_dir / "cvk.hex", 0o600)
    os.chmod(keys_dir, 0o755)
    with pytest.raises(KeyFileError):
        CardKeys.load(keys_dir)
    os.chmod(keys_dir, 0o700)
    (keys_dir / "pvk.hex").unlink()
    with pytest.raises(KeyFileError) as raised:
        CardKeys.load(keys_dir)
    assert "pvk.hex" in str(raised.value)
    with pytest.raises(KeyFileError):
        CardKeys.load(tmp_path / "nowhere")


def test_read_key_file_for_the_network_side(tmp_path: Path) -> None:
    keys = CardKeys.generate()
    keys.write(tmp_path / "keys")
    assert cardsec.read_key_file(tmp_path / "keys" / "zpk.hex", 16) == keys.zpk
    assert len(cardsec.key_check_value(keys.zpk)) == 6
