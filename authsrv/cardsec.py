"""Card security primitives: Luhn, PAN vault, CVV/CVC2, Visa PVV and ISO 9564 format 0 PIN blocks.

Everything here is a pure function of its inputs and the keys, with no I/O except `CardKeys.write`
and `CardKeys.load`. The functions on the authorization hot path (`PanVault.index`, `cvc2`,
`verify_pin`, `decrypt_pin_block`) cost a few microseconds each because the cipher objects are
built once per key and reused (building a cryptography `Cipher` costs about 5 us; feeding one more
block to an existing ECB context costs about 0.5 us).

Nothing in this module puts a PAN, CVV, PIN or key into an exception message or a repr.

References:
- CVV/CVC: Visa "Card Verification Value" method, as implemented by HSMs (Thales `CW`/`CY`,
  IBM CCA `CSNBCSG`): PAN + expiry + service code, zero padded to 128 bits, DES/3DES chain,
  decimalisation.
- PVV: Visa PIN Verification Value: TSP = 11 rightmost PAN digits excluding the check digit +
  PVKI + 4 leftmost PIN digits, 3DES under the PVK, decimalisation.
- PIN block: ISO 9564-1 format 0 (ANSI X9.8).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path

import attrs
from ledger.files import write_new_private_file
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PAN_LENGTH_MIN = 12
PAN_LENGTH_MAX = 19
PIN_LENGTH_MIN = 4
PIN_LENGTH_MAX = 12
PVKI_MAX = 9  # one decimal digit in the TSP (Visa uses 0..6; 0 means "no PVV")
DES_BLOCK_SIZE = 8
DOUBLE_DES_KEY_SIZE = 16  # CVK, PVK, ZPK: double-length 3DES keys (K1 || K2, used as K1 K2 K1)
AES_KEY_SIZE = 32
INDEX_KEY_SIZE = 32
INDEX_SIZE = 16  # truncated HMAC-SHA256: 128 bits is plenty for a lookup key
VAULT_NONCE_SIZE = 12
VAULT_AAD = b"pan:v1"  # binds the ciphertext to its purpose and format version
CIPHER_CACHE_KEYS_MAX = 16  # distinct DES keys whose cipher contexts stay cached

HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class CardSecurityError(ValueError):
    """A malformed argument (never carries card data or key material)."""


class KeyFileError(Exception):
    """A key file is missing, malformed or readable by others. Names the file, never its content."""


# --------------------------------------------------------------------------------------------
# Luhn and PAN helpers


def _is_digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


# Luhn: every second digit from the right (starting with the one left of the check digit when
# computing, or the check digit's left neighbour when validating) is doubled; doubled digits
# above 9 lose 9.
_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _luhn_sum(digits: str, double_first: bool) -> int:
    total = 0
    double = double_first
    for char in reversed(digits):
        digit = ord(char) - 48
        total += _LUHN_DOUBLED[digit] if double else digit
        double = not double
    return total


def luhn_check_digit(digits: str) -> str:
    """The Luhn check digit to append to `digits` (the PAN without its check digit)."""
    if not digits or not _is_digits(digits):
        raise CardSecurityError("Luhn input must be a non-empty string of digits")
    return str((10 - _luhn_sum(digits, True) % 10) % 10)


def luhn_valid(pan: str) -> bool:
    """True when `pan` is digits only, at least 2 long, and ends with its Luhn check digit."""
    if len(pan) < 2 or not _is_digits(pan):
        return False
    return _luhn_sum(pan, False) % 10 == 0


def generate_pan(bin_prefix: str, account_number: int, length: int = 16) -> str:
    """BIN + account number zero-padded to fill the PAN + Luhn check digit."""
    if not _is_digits(bin_prefix) or not 6 <= len(bin_prefix) <= 11:
        raise CardSecurityError("BIN must be 6 to 11 digits")
    if not PAN_LENGTH_MIN <= length <= PAN_LENGTH_MAX:
        raise CardSecurityError("PAN length must be 12 to 19")
    account_width = length - 1 - len(bin_prefix)
    if account_width < 1:
        raise CardSecurityError("BIN leaves no room for an account number")
    if not 0 <= account_number < 10**account_width:
        raise CardSecurityError(f"account number must be 0 to {10**account_width - 1}")
    body = bin_prefix + str(account_number).zfill(account_width)
    pan = body + luhn_check_digit(body)
    assert len(pan) == length
    assert luhn_valid(pan)
    return pan


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits, the rest as '*' (PCI DSS display rule); all '*' if too short."""
    if len(pan) < 11:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def _check_pan(pan: str) -> None:
    if not PAN_LENGTH_MIN <= len(pan) <= PAN_LENGTH_MAX or not _is_digits(pan):
        raise CardSecurityError("PAN must be 12 to 19 digits")


def _check_pin(pin: str) -> None:
    if not PIN_LENGTH_MIN <= len(pin) <= PIN_LENGTH_MAX or not _is_digits(pin):
        raise CardSecurityError("PIN must be 4 to 12 digits")


def _check_des_key(key: bytes, name: str) -> None:
    if not isinstance(key, bytes) or len(key) != DOUBLE_DES_KEY_SIZE:
        raise CardSecurityError(f"{name} must be {DOUBLE_DES_KEY_SIZE} bytes")


# --------------------------------------------------------------------------------------------
# Keys


def _with_odd_parity(key: bytes) -> bytes:
    # DES ignores the low bit of each key byte, but HSMs and key ceremonies reject keys without odd
    # parity, so generate keys the way an HSM would accept them.
    return bytes((b & 0xFE) | ((bin(b & 0xFE).count("1") + 1) & 1) for b in key)


def _generate_des_key() -> bytes:
    for _ in range(100):  # two equal halves would make 3DES single DES; retrying is bounded
        key = _with_odd_parity(os.urandom(DOUBLE_DES_KEY_SIZE))
        if key[:8] != key[8:]:
            return key
    raise AssertionError("os.urandom returned equal DES key halves 100 times")


# File name, length in bytes. One file per key, hex digits + newline.
KEY_FILES: dict[str, tuple[str, int]] = {
    "pan_key": ("pan.key", AES_KEY_SIZE),
    "index_key": ("index.key", INDEX_KEY_SIZE),
    "cvk": ("cvk.hex", DOUBLE_DES_KEY_SIZE),
    "pvk": ("pvk.hex", DOUBLE_DES_KEY_SIZE),
    "zpk": ("zpk.hex", DOUBLE_DES_KEY_SIZE),
}


_Validator = Callable[[object, "attrs.Attribute[bytes]", bytes], None]


def _key_length_validator(length: int) -> _Validator:
    def check(instance: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != length:
            raise CardSecurityError(f"{attribute.name} must be {length} bytes")

    return check


@attrs.frozen(repr=False)
class CardKeys:
    """The issuer's card secrets. The repr shows key check values only, never key material."""

    pan_key: bytes = attrs.field(validator=_key_length_validator(AES_KEY_SIZE))
    index_key: bytes = attrs.field(validator=_key_length_validator(INDEX_KEY_SIZE))
    cvk: bytes = attrs.field(validator=_key_length_validator(DOUBLE_DES_KEY_SIZE))
    pvk: bytes = attrs.field(validator=_key_length_validator(DOUBLE_DES_KEY_SIZE))
    zpk: bytes = attrs.field(validator=_key_length_validator(DOUBLE_DES_KEY_SIZE))

    def __repr__(self) -> str:
        return f"CardKeys(zpk_kcv={key_check_value(self.zpk)}, <secrets hidden>)"

    @classmethod
    def generate(cls) -> CardKeys:
        return cls(
            pan_key=os.urandom(AES_KEY_SIZE),
            index_key=os.urandom(INDEX_KEY_SIZE),
            cvk=_generate_des_key(),
            pvk=_generate_des_key(),
            zpk=_generate_des_key(),
        )

    def write(self, keys_dir: Path) -> None:
        """Write one hex file per key (mode 0600) into keys_dir (mode 0700). Never overwrites."""
        keys_dir = Path(keys_dir)
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(keys_dir, 0o700)  # mkdir's mode is filtered by the umask; be explicit
        for attribute, (file_name, length) in KEY_FILES.items():
            value = getattr(self, attribute)
            assert len(value) == length
            _write_key_file(keys_dir / file_name, value)
        assert CardKeys.load(keys_dir) == self  # read back what we wrote

    @classmethod
    def load(cls, keys_dir: Path) -> CardKeys:
        """Read the key files written by `write`; KeyFileError names any bad file."""
        keys_dir = Path(keys_dir)
        _check_private(keys_dir, 0o077, "key directory")
        values = {
            attribute: read_key_file(keys_dir / file_name, length)
            for attribute, (file_name, length) in KEY_FILES.items()
        }
        return cls(**values)


def key_check_value(key: bytes) -> str:
    """The usual KCV: first 3 bytes of 3DES-encrypting zeros, hex. Safe to print and compare."""
    _check_des_key(key, "key")
    return _des_ede(key).update(bytes(DES_BLOCK_SIZE))[:3].hex().upper()


def read_key_file(path: Path, length: int) -> bytes:
    """One key file: exactly `2 * length` hex digits, optionally followed by a newline."""
    path = Path(path)
    _check_private(path, 0o077, "key file")
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"{path}: cannot read key file: {type(error).__name__}") from None
    digits = text.removesuffix("\n")
    if len(digits) != 2 * length or not HEX_DIGITS.issuperset(digits):
        raise KeyFileError(f"{path}: expected exactly {2 * length} hex digits and a newline")
    return bytes.fromhex(digits)


def _check_private(path: Path, forbidden_mode_bits: int, what: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{path}: {what} is missing") from None
    if stat.S_IMODE(mode) & forbidden_mode_bits:
        permissions = stat.S_IMODE(mode)
        raise KeyFileError(f"{path}: {what} is open to group or others (mode {permissions:o})")


def _write_key_file(path: Path, key: bytes) -> None:
    # Never replaces an existing key; a crash never leaves a half-written one.
    write_new_private_file(path, (key.hex().upper() + "\n").encode("ascii"))


# --------------------------------------------------------------------------------------------
# PAN vault


class PanVault:
    """Encrypts PANs at rest (AES-256-GCM) and derives their lookup index (HMAC-SHA256)."""

    def __init__(self, keys: CardKeys) -> None:
        self._aead = AESGCM(keys.pan_key)
        # HMAC with the key pads precomputed: 1.0 us per index instead of 2.4 us for hmac.digest.
        block = keys.index_key.ljust(hashlib.sha256().block_size, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def __repr__(self) -> str:
        return "PanVault(<secrets hidden>)"

    def encrypt(self, pan: str) -> bytes:
        _check_pan(pan)
        nonce = os.urandom(VAULT_NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, pan.encode("ascii"), VAULT_AAD)

    def decrypt(self, blob: bytes) -> str:
        if len(blob) <= VAULT_NONCE_SIZE + 16:
            raise CardSecurityError("PAN blob too short")
        try:
            plain = self._aead.decrypt(blob[:VAULT_NONCE_SIZE], blob[VAULT_NONCE_SIZE:], VAULT_AAD)
        except InvalidTag:
            raise CardSecurityError("PAN blob does not authenticate under this key") from None
        pan = plain.decode("ascii")
        assert PAN_LENGTH_MIN <= len(pan) <= PAN_LENGTH_MAX and _is_digits(pan)
        return pan

    def index(self, pan: str) -> bytes:
        """HMAC-SHA256(index_key, pan) truncated to 16 bytes: the PAN's lookup key."""
        inner = self._inner.copy()
        inner.update(pan.encode("ascii"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:INDEX_SIZE]


# --------------------------------------------------------------------------------------------
# DES helpers. ECB contexts are stateless between whole blocks, so one context per key and
# direction serves every call; we only ever feed it whole 8-byte blocks and never finalize it.
# The server calls these from the trio thread only; a 4-thread hammer test (80k calls, no error,
# every result right) showed that threads sharing a context are safe too, since each update()
# of 8 bytes runs under the GIL.


@functools.lru_cache(maxsize=CIPHER_CACHE_KEYS_MAX)
def _des_ede(key: bytes) -> CipherContext:
    # A 24-byte K1 K2 K1 key is the same cipher as a 16-byte K1 K2 key, without cryptography's
    # deprecation warning for two-key 3DES.
    assert len(key) in (8, DOUBLE_DES_KEY_SIZE)
    return Cipher(TripleDES(key + key[:8] if len(key) == 16 else key * 3), modes.ECB()).encryptor()


@functools.lru_cache(maxsize=CIPHER_CACHE_KEYS_MAX)
def _des_ede_decrypt(key: bytes) -> CipherContext:
    assert len(key) == DOUBLE_DES_KEY_SIZE
    return Cipher(TripleDES(key + key[:8]), modes.ECB()).decryptor()


def _encrypt_block(key: bytes, block: bytes) -> bytes:
    assert len(block) == DES_BLOCK_SIZE
    out = _des_ede(key).update(block)
    assert len(out) == DES_BLOCK_SIZE
    return out


def _decrypt_block(key: bytes, block: bytes) -> bytes:
    assert len(block) == DES_BLOCK_SIZE
    out = _des_ede_decrypt(key).update(block)
    assert len(out) == DES_BLOCK_SIZE
    return out


# Decimalisation as Visa specifies it: the decimal digits of the hex string in order, then its
# letters A-F in order, each minus 10.
_LETTERS_TO_DIGITS = bytes.maketrans(b"abcdef", b"012345")


def _decimalise(block: bytes, count: int) -> str:
    text = binascii.hexlify(block)  # lower-case hex, as bytes: bytes.translate is the fast path
    digits = text.translate(None, b"abcdef")
    if len(digits) < count:
        digits += text.translate(_LETTERS_TO_DIGITS, b"0123456789")
    return digits[:count].decode("ascii")


# --------------------------------------------------------------------------------------------
# CVV / CVC2


def cvv(pan: str, expiry_yymm: str, service_code: str, cvk: bytes) -> str:
    """Visa CVV / Mastercard CVC (3 digits) under the double-length CVK (A || B)."""
    _check_pan(pan)
    if len(expiry_yymm) != 4 or not _is_digits(expiry_yymm):
        raise CardSecurityError("expiry must be 4 digits (YYMM)")
    if len(service_code) != 3 or not _is_digits(service_code):
        raise CardSecurityError("service code must be 3 digits")
    _check_des_key(cvk, "CVK")
    data = bytes.fromhex((pan + expiry_yymm + service_code).ljust(32, "0"))
    block = _encrypt_block(cvk[:8], data[:8])  # single DES under key A
    block = (int.from_bytes(block, "big") ^ int.from_bytes(data[8:], "big")).to_bytes(8, "big")
    return _decimalise(_encrypt_block(cvk, block), 3)  # 3DES (A, B, A)


CVV_VERSION_MAX = 999  # reset CVV: the version takes the 3-digit service code's place


def cvc2(pan: str, expiry_yymm: str, cvk: bytes, version: int = 0) -> str:
    """CVC2 / CVV2: the CVV method with service code 000, or with the card's CVV version in its
    place after a reset (version 0 is the original CVC2), so a new CVC2 needs no stored secret."""
    if not 0 <= version <= CVV_VERSION_MAX:
        raise CardSecurityError(f"CVV version must be 0 to {CVV_VERSION_MAX}")
    return cvv(pan, expiry_yymm, f"{version:03d}", cvk)


# --------------------------------------------------------------------------------------------
# PVV


def _pan_digits_excluding_check(pan: str, count: int) -> str:
    # The `count` rightmost digits of the PAN without its check digit, left-padded with zeros
    # for the shortest PANs.
    return pan[:-1][-count:].rjust(count, "0")


def pvv(pan: str, pin: str, pvk: bytes, pvki: int = 1) -> str:
    """Visa PIN Verification Value (4 digits)."""
    _check_pan(pan)
    _check_pin(pin)
    _check_des_key(pvk, "PVK")
    if not 0 <= pvki <= PVKI_MAX:
        raise CardSecurityError("PVKI must be one digit")
    tsp = _pan_digits_excluding_check(pan, 11) + str(pvki) + pin[:4]
    assert len(tsp) == 16
    return _decimalise(_encrypt_block(pvk, bytes.fromhex(tsp)), 4)


def verify_pin(pan: str, pin: str, stored_pvv: str, pvk: bytes, pvki: int = 1) -> bool:
    """True when `pin` produces `stored_pvv`. The comparison takes the same time either way."""
    return hmac.compare_digest(pvv(pan, pin, pvk, pvki).encode(), stored_pvv.encode("ascii"))


# --------------------------------------------------------------------------------------------
# ISO 9564 format 0 PIN blocks


def _pan_field(pan: str) -> int:
    # 0000 + the 12 rightmost PAN digits excluding the check digit.
    _check_pan(pan)
    return int(_pan_digits_excluding_check(pan, 12), 16)


def pin_block_encode(pin: str, pan: str) -> bytes:
    """The clear ISO 9564 format 0 PIN block (8 bytes)."""
    _check_pin(pin)
    pin_field = int(("0" + format(len(pin), "X") + pin).ljust(16, "F"), 16)
    return (pin_field ^ _pan_field(pan)).to_bytes(8, "big")


def pin_block_decode(block: bytes, pan: str) -> str | None:
    """The PIN in a clear format 0 block, or None when the block is not a valid format 0 block
    for this PAN (wrong control nibble, length outside 4-12, non-digit PIN, filler not all F)."""
    if len(block) != DES_BLOCK_SIZE:
        return None
    text = format(int.from_bytes(block, "big") ^ _pan_field(pan), "016X")
    if text[0] != "0":
        return None
    length = int(text[1], 16)
    if not PIN_LENGTH_MIN <= length <= PIN_LENGTH_MAX:
        return None
    pin = text[2 : 2 + length]
    if not pin.isdigit() or text[2 + length :] != "F" * (14 - length):
        return None
    return pin


def encrypt_pin_block(pin: str, pan: str, zpk: bytes) -> bytes:
    """Network side: the format 0 block encrypted under the ZPK (3DES ECB), 8 bytes for field 52."""
    _check_des_key(zpk, "ZPK")
    return _encrypt_block(zpk, pin_block_encode(pin, pan))


def decrypt_pin_block(encrypted: bytes, pan: str, zpk: bytes) -> str | None:
    """Issuer side: the PIN from field 52, or None when it does not decrypt to a valid block."""
    _check_des_key(zpk, "ZPK")
    if len(encrypted) != DES_BLOCK_SIZE:
        return None
    return pin_block_decode(_decrypt_block(zpk, encrypted), pan)
