"""What the trusted third party derives back from what is stored: a study's original date.
(The originals themselves are read from the vault, `Vault.lookup`.)"""

from __future__ import annotations

from datetime import date, timedelta

from core.core import Core
from deid.profile import Option


def study_date(core: Core, name: str, patient_id: str, stored: str | None) -> date | None:
    """The original date of a study stored as `stored` (YYYYMMDD) for original Patient ID
    `patient_id`: shifted back (modified dates), as stored (full dates), or None when the
    project's profile removes dates."""
    if not stored or len(stored) != 8 or not stored.isdigit():
        return None
    d = date(int(stored[:4]), int(stored[4:6]), int(stored[6:]))
    options = core.profile(name).options
    if Option.RETAIN_LONG_MODIFIED_DATES in options:
        return d - timedelta(days=core.keys(name).date_shift_days(patient_id))
    return d if Option.RETAIN_LONG_FULL_DATES in options else None
