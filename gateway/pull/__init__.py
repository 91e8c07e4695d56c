"""The pull: plan, retrieve, verify, commit (`puller`), the PACS reached through a `Retriever`
(`retrievers`: C-MOVE, C-GET), instances received, de-identified and spooled by a `Receiver`
(`receiver`), the series a pull waits for announced by markers (`layout`)."""

from gateway.pull.lock import PullBusy
from gateway.pull.puller import Puller, PullRefused, pull
from gateway.pull.report import PullProgress, PullReport, SeriesOutcome

__all__ = [
    "PullBusy",
    "PullProgress",
    "PullRefused",
    "PullReport",
    "Puller",
    "SeriesOutcome",
    "pull",
]
