"""The vault key: AES-GCM for what the vault keeps, keyed digests for what is looked up by value.

One 32-byte key, held by the trusted side only (SPHERE_VAULT_KEY_FILE or SPHERE_VAULT_KEY). Two
independent keys are derived from it (HKDF-SHA256): one encrypts, one makes digests. Each value is
sealed with a fresh nonce and associated data naming its row (table, project, kind, lookup key), so
a ciphertext moved to another row does not open there.

A third derivation is the inbox: an X25519 key pair whose public half the catalog holds, so the
research side (`sphere serve`, which never has the vault key) can seal what only the trusted side
opens, such as the originals of an investigator's study request (`seal_to_inbox`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_VERSION = b"\x01"  # the first byte of a sealed value: the format, for a later change of it
_NONCE = 12


class Tampered(ValueError):
    """A sealed value that does not open: another key, another row, or altered bytes."""


def _derive(key: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"sphere-vault " + purpose).derive(key)


def _context(parts: tuple[str, ...]) -> bytes:
    return b"\x00".join(p.encode("utf-8", "surrogateescape") for p in parts)


class VaultKey:
    """Seal and open the vault's values; keyed digests for lookups by value."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a vault key is {KEY_BYTES} bytes")
        self._aead = AESGCM(_derive(key, b"aead"))
        self._mac = _derive(key, b"digest")
        self._inbox = X25519PrivateKey.from_private_bytes(_derive(key, b"inbox"))

    @classmethod
    def generate(cls) -> VaultKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str) -> VaultKey:
        """A key written as 64 hex digits or base64 of 32 bytes (ValueError otherwise)."""
        return cls(parse_key(text))

    def seal(self, value: bytes, *context: str) -> bytes:
        """`value` encrypted under a fresh nonce, bound to `context` (the row it belongs to)."""
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, value, _context(context))

    def open(self, sealed: bytes, *context: str) -> bytes:
        """The value `seal` was given with the same context; `Tampered` otherwise."""
        sealed = bytes(sealed)
        if sealed[:1] != _VERSION or len(sealed) < 1 + _NONCE + 16:
            raise Tampered("not a sealed value")
        nonce, body = sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :]
        try:
            return self._aead.decrypt(nonce, body, _context(context))
        except InvalidTag:
            raise Tampered("a sealed value does not open with this key in this row") from None

    def seal_text(self, value: str, *context: str) -> str:
        """`seal` for a text column: base64 of the sealed bytes."""
        return base64.b64encode(
            self.seal(value.encode("utf-8", "surrogateescape"), *context)
        ).decode()

    def open_text(self, sealed: str, *context: str) -> str:
        try:
            raw = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            raise Tampered("not a sealed value") from None
        return self.open(raw, *context).decode("utf-8", "surrogateescape")

    def digest(self, domain: str, value: str) -> str:
        """A keyed digest of `value` in a named domain (64 hex digits): what a table keeps to find
        a value by value (e.g. an opt-out register) without keeping the value."""
        msg = _context((domain, value))
        return hmac.new(self._mac, msg, hashlib.sha256).hexdigest()

    def inbox_public(self) -> str:
        """The inbox's public key (64 hex digits), for the catalog: seals, opens nothing."""
        return self._inbox.public_key().public_bytes_raw().hex()

    def open_inbox(self, sealed: str, *context: str) -> bytes:
        """What `seal_to_inbox` sealed to this key's inbox with the same context."""
        try:
            raw = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            raise Tampered("not a sealed value") from None
        if raw[:1] != _VERSION or len(raw) < 1 + 32 + _NONCE + 16:
            raise Tampered("not a sealed value")
        ephemeral, nonce, body = raw[1:33], raw[33 : 33 + _NONCE], raw[33 + _NONCE :]
        shared = self._inbox.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        try:
            return AESGCM(_inbox_key(shared, ephemeral)).decrypt(nonce, body, _context(context))
        except InvalidTag:
            raise Tampered("a sealed value does not open with this key in this row") from None

    def check(self) -> str:
        """What the vault keeps to recognise its key (a digest, tells nothing of the key)."""
        return self.digest("key-check", "sphere-vault")


def seal_to_inbox(public_hex: str, value: bytes, *context: str) -> str:
    """`value` sealed to the inbox whose public key is `public_hex` (ephemeral X25519, then
    AES-GCM bound to `context`), as base64: only the vault key's holder opens it."""
    ephemeral = X25519PrivateKey.generate()
    mine = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)))
    nonce = os.urandom(_NONCE)
    body = AESGCM(_inbox_key(shared, mine)).encrypt(nonce, value, _context(context))
    return base64.b64encode(_VERSION + mine + nonce + body).decode()


def _inbox_key(shared: bytes, ephemeral: bytes) -> bytes:
    info = b"sphere-inbox " + ephemeral
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(shared)


def parse_key(text: str) -> bytes:
    """32 bytes from 64 hex digits or base64 (standard or URL-safe); ValueError otherwise."""
    text = text.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(
            text + "=" * (-len(text) % 4),
            altchars=b"-_" if "-" in text or "_" in text else None,
            validate=True,
        )
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"a vault key is {KEY_BYTES} bytes as 64 hex digits or base64")
    return raw


def new_key_text() -> str:
    """A fresh key as text (base64), for a key file."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()
