"""How sphere's processes log: text or JSON lines (`--log-format`, SPHERE_LOG_FORMAT) on stderr.

At the default level only sphere's warnings and errors show; the chatter of the libraries under
it (Dask, urllib3, tornado) and library warnings (`warnings.warn`: distributed's "Port 8787 is
already in use", MONAI's optional codecs) stay out. `-v` shows our progress and all of theirs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
VERBOSE = "SPHERE_LOG_VERBOSE"  # "1": `sphere -v serve` tells its web worker processes
# Loggers of libraries that talk at INFO (and warn of what an operator cannot act on).
CHATTY = ("distributed", "dask", "tornado", "asyncio", "urllib3", "py.warnings", "monai", "torch")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
_STANDARD |= {"message", "asctime", "color_message"}  # uvicorn's message with ANSI colours


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, and whatever the
    call gave as `extra=`; a traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: str, text: str = TEXT) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(text)


def setup(verbose: bool, fmt: str = "text") -> Callable[[], None]:
    """Configure this process's logging (the CLI, a web worker process), unless something
    else did (a test runner's handlers: left alone, as `logging.basicConfig` leaves them).
    Returns what undoes the environment it set for the processes started from here."""
    root = logging.getLogger()
    if any(not getattr(h, "sphere", False) for h in root.handlers):
        return lambda: None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.sphere = True  # type: ignore[attr-defined]  # our mark: replaced when set up again
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn goes through "py.warnings", below
    level = "NOTSET" if verbose else "ERROR"
    for name in CHATTY:
        logging.getLogger(name).setLevel(level)
    # Dask sets its loggers' levels and handlers when imported, in this process and in each
    # of its workers: this configuration (its "new style", applied over what is there) puts
    # theirs and MONAI's at our level and sends them to our handler.
    chatty = {n: {"level": level, "propagate": True} for n in CHATTY}
    chatty["distributed"]["level"] = "INFO" if verbose else "ERROR"
    env = {"DASK_LOGGING": repr({"version": 1, "incremental": True, "loggers": chatty})}
    if not verbose:  # processes started from here warn before anything configures them
        env["PYTHONWARNINGS"] = "ignore"
    env = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(env)

    def undo() -> None:
        for k in env:
            os.environ.pop(k, None)

    return undo


def in_worker(fmt: str) -> None:
    """A worker process (the Storage SCP's) logging in the given format: its handlers keep
    their level and stream, take this format."""
    if fmt != "json":
        return
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())
