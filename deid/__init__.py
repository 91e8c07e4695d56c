"""De-identification: PS3.15 Annex E profile, engine, keyed pseudonyms, re-identification vault."""
