"""Sign-in sessions kept server-side: the cookie is a random value, only its digest is stored,
and ending the row ends the session."""

from __future__ import annotations

from core import Core, Settings, users
from gateway.web import sessions
from harness.leaks import scan_database


def test_session_rows_hold_a_digest_and_end(tmp_path):
    core = Core(Settings(home=tmp_path, actor="tester"), create=True)
    users.add(core, "ann")
    ann = core.catalog.user("ann")
    value = sessions.start(core.catalog, ann, 60)
    assert sessions.well_formed(value) and len(value) > 40
    found = core.catalog.web_session(sessions.digest(value))
    assert found is not None and found.user_id == ann.id
    assert found.token_fingerprint == sessions.fingerprint(ann.token_hash)
    # Only the digest is kept: the cookie's value is nowhere in the catalog's bytes.
    assert scan_database(core.settings.resolved_catalog_url(), [value]) == []
    assert scan_database(core.settings.resolved_catalog_url(), [sessions.digest(value)])  # control
    core.catalog.end_web_session(sessions.digest(value))
    assert core.catalog.web_session(sessions.digest(value)) is None
    expired = sessions.start(core.catalog, ann, -1)
    assert core.catalog.web_session(sessions.digest(expired)) is None
    assert not sessions.well_formed("garbage") and not sessions.well_formed("ses_\u00e9")
    core.close()
