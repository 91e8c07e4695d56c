"""An S3 bucket that lists every key read through zarr's store API: how the commit test and
benchmark count the GETs a commit makes (`counting`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from storage.backends import ObjectBucket


def counting(store: Any) -> tuple[ObjectBucket, list[str]]:
    """The same bucket (an `ObjectBucket` as `open_store` opens one), and the list every key it
    reads is appended to (one entry a GET). The list is the class's: zarr opens a store again
    read-only as a new instance."""
    gets: list[str] = []

    class Counting(ObjectBucket):
        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            gets.append(key)
            return await super().get(key, prototype, byte_range)

        async def get_partial_values(
            self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]
        ) -> Any:
            key_ranges = list(key_ranges)
            gets.extend(k for k, _ in key_ranges)
            return await super().get_partial_values(prototype, key_ranges)

    return Counting(store.store, read_only=store.read_only), gets


def chunks(keys: list[str]) -> list[str]:
    """The chunk (shard) objects among `keys`: all but the zarr.json metadata documents."""
    return [k for k in keys if not k.endswith("zarr.json")]
