"""De-identification: PS3.15 Annex E profile, engine, keyed pseudonyms, re-identification vault.

- `deid.table`: Table E.1-1 (2025b) as data, with its provenance.
- `deid.profile`: `Profile` (options by CID 7050 meaning, safe private attributes, burned-in
  policy) and the action of each row under it.
- `deid.keys`: `ProjectKeys`, HMAC-SHA256 pseudonyms, UIDs and per-patient date shifts.
- `deid.engine`: `Deidentifier.apply(ds)`, in place, raising `Quarantined(reason)`.
- `deid.vault`: `Vault`, the original <-> pseudonym mapping and project secrets, in a database of
  its own, read only by an audited trusted third party.
"""

import dicom  # noqa: F401 - pydicom keeps values (PHI) out of its messages
