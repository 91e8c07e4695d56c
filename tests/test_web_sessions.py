"""Sign-in cookies: signed, expiring, bound to the user's current token; the secret is private."""

from __future__ import annotations

import time

from gateway.web import sessions


def test_cookie_round_trip_tamper_expiry(tmp_path):
    secret = sessions.load_secret(tmp_path)
    assert sessions.load_secret(tmp_path) == secret and len(secret) == 32
    assert (tmp_path / sessions.SECRET_FILE).stat().st_mode & 0o077 == 0
    value = sessions.make(secret, 7, "ab" * 32, 60)
    assert sessions.read(secret, value) == (7, ("ab" * 32)[:16])
    user, rest = value.split(".", 1)
    assert sessions.read(secret, f"8.{rest}") is None  # another user: the signature breaks
    assert sessions.read(b"x" * 32, value) is None  # another gateway's secret
    assert sessions.read(secret, value[:-1] + ("0" if value[-1] != "0" else "1")) is None
    assert sessions.read(secret, "garbage") is None and sessions.read(secret, "") is None
    expired = sessions.make(secret, 7, "ab" * 32, -1)
    assert sessions.read(secret, expired) is None
    assert int(value.split(".")[1]) <= time.time() + 61
