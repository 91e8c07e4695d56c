"""A pull's progress on the terminal: a live bar (rich) at a terminal, plain lines elsewhere.

Fed the progress dict a job keeps (`PullProgress.as_dict`): instances, total, bytes, rate,
series. Used by `sphere pull P` (polling the puller) and `sphere jobs watch ID` (polling the
catalog)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def line(progress: dict[str, Any]) -> str:
    """One plain line: instances of total, series, bytes, rate."""
    if not progress:
        return "no progress yet"
    return (
        f"{progress.get('instances', 0)}/{progress.get('total', 0)} instances, "
        f"{progress.get('series', 0)}/{progress.get('series_total', 0)} series, "
        f"{mb(progress.get('bytes', 0))}, {progress.get('rate', 0):.0f} instances/s"
    )


class Display:
    """`update(progress)` as often as you like; `close()` at the end. A bar at a terminal
    (stderr), else a plain line on stdout whenever it changed, at most every `every_s`."""

    def __init__(self, title: str, *, live: bool | None = None, every_s: float = 5.0) -> None:
        self.live = sys.stderr.isatty() if live is None else live
        self.every_s = every_s
        self._last = ""
        self._shown_at = 0.0
        self._bar: Progress | None = None
        if self.live:
            self._bar = Progress(
                TextColumn(title),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[extra]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=None, extra="planning")

    def update(self, progress: dict[str, Any]) -> None:
        if self.live and self._bar is None:  # closed
            return
        if self._bar is not None:
            extra = (
                f"{progress.get('series', 0)}/{progress.get('series_total', 0)} series "
                f"{mb(progress.get('bytes', 0))} {progress.get('rate', 0):.0f}/s"
            )
            total = progress.get("total") or None
            self._bar.update(
                self._task, completed=progress.get("instances", 0), total=total, extra=extra
            )
            return
        text = line(progress)
        now = time.monotonic()
        if text != self._last and now - self._shown_at >= self.every_s:
            print(text, flush=True)
            self._last, self._shown_at = text, now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
