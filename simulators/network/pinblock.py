"""ISO 9564-1 format 0 PIN blocks under a triple-DES zone PIN key (docs/contract.md, wire profile: field 52).

Written here rather than imported from `authsrv.cardsec` so that the simulator stays an independent
peer: a bug in the server's PIN code then shows up as `55` mismatches instead of cancelling out.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

PIN_DIGITS_MIN = 4  # ISO 9564-1
PIN_DIGITS_MAX = 12
PIN_BLOCK_SIZE = 8  # bytes
ZPK_HEX_DIGITS = 32  # double-length key, as `authsrv init` writes DIR/keys/zpk.hex
PAN_DIGITS_MIN = 13


def clear_pin_block(pin: str, pan: str) -> bytes:
    """Format 0: (0, length, PIN, F padding) XOR (0000, 12 rightmost PAN digits without the check digit)."""
    assert pin.isdigit() and PIN_DIGITS_MIN <= len(pin) <= PIN_DIGITS_MAX, "PIN must be 4..12 digits"
    assert pan.isdigit() and len(pan) >= PAN_DIGITS_MIN, "PAN must be 13+ digits"
    pin_field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
    pan_field = bytes.fromhex("0000" + pan[-13:-1])
    block = bytes(a ^ b for a, b in zip(pin_field, pan_field, strict=True))
    assert len(block) == PIN_BLOCK_SIZE
    return block


def encrypt_pin_block(pin: str, pan: str, zpk: bytes) -> bytes:
    """The 8-byte field 52 value: the clear format 0 block encrypted with 3DES-ECB under the ZPK."""
    encryptor = Cipher(TripleDES(_triple_length(zpk)), modes.ECB()).encryptor()
    block = encryptor.update(clear_pin_block(pin, pan)) + encryptor.finalize()
    assert len(block) == PIN_BLOCK_SIZE
    return block


def decrypt_pin_block(block: bytes, zpk: bytes) -> bytes:
    """The clear block back (used by tests to check the round trip)."""
    assert len(block) == PIN_BLOCK_SIZE
    decryptor = Cipher(TripleDES(_triple_length(zpk)), modes.ECB()).decryptor()
    return decryptor.update(block) + decryptor.finalize()


def _triple_length(zpk: bytes) -> bytes:
    """K1 K2 -> K1 K2 K1: the same cipher; cryptography deprecates 16-byte TripleDES keys."""
    assert len(zpk) in (16, 24), "ZPK must be a double- or triple-length DES key"
    return zpk + zpk[:8] if len(zpk) == 16 else zpk


def parse_zpk_hex(text: str) -> bytes:
    """The ZPK from the 32 hex digits of DIR/keys/zpk.hex (surrounding whitespace allowed)."""
    digits = text.strip()
    if len(digits) != ZPK_HEX_DIGITS:
        raise ValueError(f"zone PIN key must be {ZPK_HEX_DIGITS} hex digits, got {len(digits)}")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise ValueError("zone PIN key is not hexadecimal") from None


def load_zpk(path: Path) -> bytes:
    return parse_zpk_hex(path.read_text(encoding="ascii"))
