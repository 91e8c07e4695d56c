"""Failed sign-ins and bad tokens, counted per client address: past `most` in `window_s`
seconds the address is answered 429 without its credential being tried (a guess is then
worth nothing). Kept in memory, per worker process; bounded in the addresses it holds."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque


class Failures:
    def __init__(self, most: int, window_s: float, addresses: int = 10_000) -> None:
        self.most = most
        self.window_s = window_s
        self.addresses = addresses
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._seen.pop(address, None) or deque(maxlen=self.most)
            times.append(now)
            self._seen[address] = times  # last: the most recently failing
            while len(self._seen) > self.addresses:
                self._seen.popitem(last=False)

    def retry_after(self, address: str) -> int:
        """Seconds until this address may try again; 0 when it may now."""
        with self._lock:
            times = self._seen.get(address)
            if times is None or len(times) < self.most:
                return 0
            left = times[0] + self.window_s - time.monotonic()
        return max(0, int(left) + 1) if left > 0 else 0
