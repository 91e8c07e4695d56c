"""The vault: its own database, lasting per-project secrets, batched mappings, audited lookups."""

from __future__ import annotations

import sqlite3

import pytest

from deid.sealing import VaultKey
from deid.vault import TRUSTED_THIRD_PARTY, Vault, VaultDenied

KEY = VaultKey(bytes(range(32)))


def test_secret_is_created_once_and_kept(tmp_path):
    url = f"sqlite:///{tmp_path / 'vault.db'}"
    with Vault(url, KEY) as v:
        first = v.project_secret("a")
        assert len(first) == 32 and v.project_secret("b") != first
    with Vault(url, KEY) as again:  # reopened: same secret, so a re-pull gives the same pseudonyms
        assert again.project_secret("a") == first


def test_mappings_are_buffered_deduplicated_and_kept_apart_from_other_projects(tmp_path):
    path = tmp_path / "vault.db"
    v = Vault(f"sqlite:///{path}", KEY, batch=3)
    v.record("p", "patient", "MRN1", "PAAA")
    v.record("p", "patient", "MRN1", "PAAA")
    assert v.count("p") == 0  # still in the buffer
    v.record("p", "sop", "1.2.3", "2.25.9")  # the third fills the batch
    assert v.count("p") == 2
    v.record_many("q", [("patient", "MRN1", "PQQQ")])
    v.record_many("p", [("patient", "MRN1", "PAAA"), ("study", "1.2", "2.25.1")])
    assert v.count("p") == 3 and v.count("q") == 1
    with pytest.raises(ValueError):
        v.record_many("p", [("phone", "x", "y")])
    v.close()
    tables = {r[0] for r in sqlite3.connect(path).execute("select name from sqlite_master")}
    assert {
        "vault_secrets",
        "vault_mappings",
        "vault_grants",
        "vault_audit",
        "vault_meta",
    } <= tables


def test_a_lookup_is_made_as_the_trusted_third_party_and_every_try_is_audited(tmp_path):
    # Who holds the role is the catalog's say (core.access, tested in test_access_table);
    # the vault records every try, refused ones included.
    with Vault(f"sqlite:///{tmp_path / 'vault.db'}", KEY) as v:
        v.record_many("p", [("patient", "MRN42", "PZZZ")])
        v.audit_denied("p", "PZZZ", actor="eve")  # the catalog refused eve
        with pytest.raises(VaultDenied):  # not asked in that role
            v.lookup("p", "PZZZ", role="researcher", actor="trent")
        assert v.lookup("p", "PZZZ", role=TRUSTED_THIRD_PARTY, actor="trent") == "MRN42"
        with pytest.raises(KeyError):
            v.lookup("q", "PZZZ", role=TRUSTED_THIRD_PARTY, actor="trent")  # other project
        trail = [(e.actor, e.action, e.outcome) for e in v.audit_trail()]
    assert trail == [
        ("eve", "lookup", "denied"),
        ("trent", "lookup", "denied"),
        ("trent", "lookup", "found"),
        ("trent", "lookup", "not found"),
    ]
