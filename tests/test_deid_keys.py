"""Keyed pseudonyms, UIDs and date shifts: stable within a project, unlinkable across projects."""

from __future__ import annotations

import re

import pytest

from deid.keys import ProjectKeys

UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
ORIGINAL = "1.2.826.0.1.3680043.99.8675309421.20230405.1"


def test_same_secret_same_values_in_a_new_process_state():
    a, b = ProjectKeys(b"s" * 32), ProjectKeys(b"s" * 32)
    assert a.uid(ORIGINAL) == b.uid(ORIGINAL)
    assert a.pseudonym("MRN1") == b.pseudonym("MRN1") == a.pseudonym(" MRN1 ")
    assert a.date_shift_days("MRN1") == b.date_shift_days("MRN1")
    assert a.accession("ACC1") == b.accession("ACC1")


def test_projects_are_unlinkable():
    a, b = ProjectKeys(b"a" * 32), ProjectKeys(b"b" * 32)
    assert a.uid(ORIGINAL) != b.uid(ORIGINAL)
    assert a.pseudonym("MRN1") != b.pseudonym("MRN1")
    shifts_a = [a.date_shift_days(f"MRN{i}") for i in range(200)]
    shifts_b = [b.date_shift_days(f"MRN{i}") for i in range(200)]
    assert shifts_a != shifts_b
    assert all(-365 <= s <= -1 for s in shifts_a + shifts_b)
    assert len(set(shifts_a)) > 100  # spread over the range, not a handful of values


@pytest.mark.parametrize("root", ["2.25.", "1.2.826.0.1.3680043.10.1234.", "1." * 22])
def test_uids_are_valid_under_the_root_and_hide_the_original(root):
    keys = ProjectKeys(b"k" * 32, uid_root=root)
    for original in (ORIGINAL, "1.2.3", "9" * 64):
        new = keys.uid(original)
        assert new.startswith(root) and len(new) <= 64 and UID.match(new)
        assert "8675309421" not in new and new != original
    assert len({keys.uid(f"1.2.3.{i}") for i in range(1000)}) == 1000


def test_pseudonyms_fit_their_vrs_and_bad_keys_are_refused():
    keys = ProjectKeys(b"k" * 32)
    assert re.fullmatch(r"P[A-Z2-7]{16}", keys.pseudonym("MRN1"))
    assert len(keys.accession("ACC1")) <= 16  # Accession Number is SH
    with pytest.raises(ValueError):
        ProjectKeys(b"short")
    for root in ("2.25", "01.2.", "1.2.x.", "1." * 30):
        with pytest.raises(ValueError):
            ProjectKeys(b"k" * 32, uid_root=root)
