"""Text cleaning: identifying strings found in a dataset are cut out of its free text.

Two scrubbers, both cached by the set of strings they look for (the same patient's instances share
one): `cleaner` for attributes the profile says to Clean (descriptions, comments, SR text), which
also removes anything shaped like a date, UID, long number, e-mail or phone number; and `scanner`
for retained free text, which removes only the identifying strings themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache

MASK = "***"
_MONTHS = (
    "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    "sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?|"
    "janv(?:ier)?|f[ée]vr(?:ier)?|mars|avr(?:il)?|mai|juin|juil(?:let)?|ao[uû]t|"
    "sept(?:embre)?|octobre|novembre|d[ée]c(?:embre)?"
)
# Shapes of identifying data in free text.
GENERIC = (
    r"(?<!\d)(?:19|20)\d\d[-./ ]?(?:0[1-9]|1[0-2])[-./ ]?(?:0[1-9]|[12]\d|3[01])(?:\d{6})?(?!\d)",
    r"(?<!\d)\d{1,2}[-./]\d{1,2}[-./](?:\d{4}|\d{2})(?!\d)",
    rf"(?<![a-z])\d{{1,2}}(?:st|nd|rd|th|er)?\.? (?:{_MONTHS})\.?,? (?:\d{{4}}|\d{{2}})(?!\d)",
    rf"(?<![a-z])(?:{_MONTHS})\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}(?!\d)",
    r"(?<![\d.])\d+(?:\.\d+){3,}(?![\d.])",  # UIDs and dotted identifiers
    r"\d{6,}",  # record numbers, phone numbers without separators
    r"\+?\(?\d{2,4}\)?(?:[ .-]\d{2,4}){2,}",  # phone numbers with separators
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",  # e-mail addresses
)
_STOP = {"DR", "MR", "MRS", "MS", "MD", "PHD", "PROF", "JR", "SR", "II", "III", "IV", "MME", "MLLE"}


@lru_cache(maxsize=4096)
def name_tokens(person_name: str) -> frozenset[str]:
    """A PN value's whole form and its name components, as strings to look for in text."""
    value = person_name.strip()
    if not value:
        return frozenset()
    out = {value, value.replace("^", " ").strip()}
    for part in re.split(r"[\^= ,]+", value):
        if len(part) >= 2 and part.upper().strip(".") not in _STOP:
            out.add(part)
    return frozenset(out)


@lru_cache(maxsize=4096)
def date_tokens(da: str) -> frozenset[str]:
    """A DA value (YYYYMMDD) written the ways people write dates in text."""
    if len(da) < 8 or not da[:8].isdigit():
        return frozenset()
    y, m, d = da[:4], da[4:6], da[6:8]
    return frozenset(
        {
            da[:8],
            f"{y}-{m}-{d}",
            f"{y}/{m}/{d}",
            f"{y}.{m}.{d}",
            f"{d}/{m}/{y}",
            f"{d}.{m}.{y}",
            f"{d}-{m}-{y}",
            f"{m}/{d}/{y}",
        }
    )


def _pattern(tokens: Iterable[str]) -> str:
    parts = []
    for t in sorted(set(tokens), key=len, reverse=True):
        esc = re.escape(t).replace(r"\ ", r"\s+")
        # Short strings only as whole words: 'LI' must not eat 'CLINICAL'.
        parts.append(esc if len(t) >= 4 else rf"(?<![^\W_]){esc}(?![^\W_])")
    return "|".join(parts)


@lru_cache(maxsize=256)
def scanner(tokens: frozenset[str]) -> Callable[[str], str] | None:
    """Removes the identifying strings `tokens` (case-insensitive); None when there are none."""
    usable = [t for t in tokens if len(t) >= 2]
    if not usable:
        return None
    rx = re.compile(_pattern(usable), re.IGNORECASE)
    # Memoised: the same descriptions and device strings recur across a series.
    return lru_cache(maxsize=4096)(lambda text: rx.sub(MASK, text))


@lru_cache(maxsize=256)
def cleaner(tokens: frozenset[str]) -> Callable[[str], str]:
    """Removes `tokens` and anything shaped like a date, UID, long number, e-mail or phone."""
    usable = [t for t in tokens if len(t) >= 2]
    alts = ([_pattern(usable)] if usable else []) + list(GENERIC)
    rx = re.compile("|".join(f"(?:{a})" for a in alts), re.IGNORECASE)
    return lru_cache(maxsize=4096)(lambda text: rx.sub(MASK, text))
