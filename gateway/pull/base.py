"""What every retriever shares, whatever its protocol: its errors become `SourceError`, its
exchanges are counted, and one that receives in this process holds one `Receiver`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from core import metrics
from gateway.pull.guard import SourceError
from gateway.pull.receiver import Receiver, ReceiverConfig

T = TypeVar("T")


class SourceBase:
    """A retriever's protocol errors become `SourceError`, named by it."""

    errors: type[Exception] = Exception
    name: str

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            with self.in_use():
                return fn(*args)
        except self.errors as e:
            raise SourceError(f"{self}: {e}", answered=self.answered(e)) from None

    def answered(self, e: Exception) -> bool:
        """Whether the source answered at all (an HTTP answer, a DIMSE status)."""
        return "cannot be reached" not in str(e)

    def in_use(self) -> Any:
        """Counts an association (or HTTP exchange) with the source while it is open."""
        return metrics.get().connections.labels(self.name).track_inprogress()


class ReceivesHere(SourceBase):
    """A retriever whose instances arrive in this process: one receiver, open while entered."""

    cfg: ReceiverConfig
    _receiver: Receiver | None = None

    def __enter__(self) -> ReceivesHere:
        self._receiver = Receiver(self.cfg)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    @property
    def receiver(self) -> Receiver:
        if self._receiver is None:
            raise RuntimeError("retriever used outside its `with` block")
        return self._receiver
