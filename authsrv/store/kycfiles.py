"""KYC document images at rest: `DIR/kyc/<formId>/<field>.bin`, AES-256-GCM, owner-only.

Identity documents and selfies are personal data, so they never touch the disk in the clear: the
REST layer parses the multipart body in memory, and this module encrypts each image with a key of
its own (`DIR/keys/kyc.key`, 32 random bytes, mode 0600, made on first use). The key is separate
from the card keys so it can be rotated or handed to a KYC operator without exposing card data.

File layout: MAGIC (4 bytes) | nonce (12 random bytes) | ciphertext with the 16-byte GCM tag.
The associated data is the form id and the field name, so a file copied to another form or field
fails authentication instead of showing the wrong person's document.

Ordering against the store: files are written and fsync'd (file, then directory) before the form
row commits. A crash in between leaves a directory no row points at; its form id was reserved
(committed) before the files were written, so it is never reused, and the orphan is harmless
(`orphan_form_ids` lists them for an operator to delete).
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.files import fsync_directory, write_new_private_file

KYC_DIR_NAME = "kyc"
KYC_KEY_FILE = "kyc.key"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's native nonce size; random per file (a file is written once)
TAG_BYTES = 16
MAGIC = b"KYC1"
IMAGE_FIELDS = ("imageFace", "imageFront", "imageBack")  # the only file names ever made here
FILE_SUFFIX = ".bin"
ORPHANS_LISTED_MAX = 10_000


class KycFileError(Exception):
    """An image file is missing, truncated or fails authentication (operating error, not input)."""


_fsync_dir = fsync_directory


def _write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` (new file, 0600) through a temporary name: whole file or none."""
    temporary = path.with_name(path.name + f".tmp-{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:  # bounded: each write makes progress or raises
            written = os.write(fd, view)
            assert written > 0
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _aad(form_id: int, field: str) -> bytes:
    return f"kyc-form:{form_id}:{field}".encode()


class KycFiles:
    """The encrypted image files of KYC forms under one data directory. Thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / KYC_DIR_NAME
        self.key_path = self.data_dir / "keys" / KYC_KEY_FILE
        self._lock = threading.Lock()
        self._aead: AESGCM | None = None

    # -- the key -------------------------------------------------------------------------------------

    def _cipher(self) -> AESGCM:
        with self._lock:
            if self._aead is None:
                self._aead = AESGCM(self._load_or_create_key())
            return self._aead

    def _load_or_create_key(self) -> bytes:
        if not self.key_path.exists():
            self.key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                write_new_private_file(self.key_path, secrets.token_bytes(KEY_BYTES))
            except FileExistsError:
                pass  # another process made the key meanwhile: keep theirs
        key = self.key_path.read_bytes()
        if len(key) != KEY_BYTES:
            raise KycFileError(f"{self.key_path}: expected {KEY_BYTES} bytes, found {len(key)}")
        return key

    # -- images --------------------------------------------------------------------------------------

    def form_dir(self, form_id: int) -> Path:
        assert isinstance(form_id, int) and form_id > 0, form_id
        return self.root / str(form_id)

    def image_path(self, form_id: int, field: str) -> Path:
        assert field in IMAGE_FIELDS, field  # never a client-chosen name in a path
        return self.form_dir(form_id) / (field + FILE_SUFFIX)

    def write_images(self, form_id: int, images: dict[str, bytes]) -> None:
        """Encrypt and durably write every image of a new form (before its row commits)."""
        assert images and set(images) <= set(IMAGE_FIELDS), sorted(images)
        aead = self._cipher()
        self.root.mkdir(mode=0o700, exist_ok=True)
        form_dir = self.form_dir(form_id)
        form_dir.mkdir(mode=0o700, exist_ok=False)  # a reserved id is written once
        _fsync_dir(self.root)
        for field, plain in images.items():
            assert plain, field
            nonce = secrets.token_bytes(NONCE_BYTES)
            sealed = MAGIC + nonce + aead.encrypt(nonce, plain, _aad(form_id, field))
            assert len(sealed) == len(MAGIC) + NONCE_BYTES + len(plain) + TAG_BYTES
            _write_durably(self.image_path(form_id, field), sealed)

    def read_image(self, form_id: int, field: str) -> bytes:
        """The decrypted image; KycFileError if it is missing or does not authenticate."""
        path = self.image_path(form_id, field)
        try:
            sealed = path.read_bytes()
        except FileNotFoundError:
            raise KycFileError(f"form {form_id}: image {field} missing") from None
        header = len(MAGIC) + NONCE_BYTES
        if len(sealed) < header + TAG_BYTES or not sealed.startswith(MAGIC):
            raise KycFileError(f"form {form_id}: image {field} truncated or not ours")
        try:
            return self._cipher().decrypt(sealed[len(MAGIC):header], sealed[header:], _aad(form_id, field))
        except Exception as error:  # cryptography's InvalidTag: tampered, wrong key or wrong place
            raise KycFileError(f"form {form_id}: image {field} fails authentication") from error

    def remove_form(self, form_id: int) -> None:
        """Drop the files of a form whose row never committed (lost a race to another submission)."""
        shutil.rmtree(self.form_dir(form_id), ignore_errors=True)

    def orphan_form_ids(self, known: set[int]) -> list[int]:
        """Form directories no row points at (a crash between the files and the row)."""
        if not self.root.exists():
            return []
        found = []
        for entry in self.root.iterdir():
            if len(found) >= ORPHANS_LISTED_MAX:
                break
            if entry.name.isdigit() and int(entry.name) not in known:
                found.append(int(entry.name))
        return sorted(found)
