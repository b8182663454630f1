"""How prefect-vllm's errors appear in logs: one line each, no traceback.

Prefect logs the exception that ends a flow run with its traceback. Our own errors
are written for the user to read as they are, so their tracebacks are dropped from
every handler Prefect has set up (the console and the run's logs on the server).
"""

from __future__ import annotations

import logging

__all__ = ["quiet_refusals"]


class _RefusalWithoutTraceback(logging.Filter):
    """Prefect logs the exception that ends a flow run with its traceback. Our own errors
    (a refusal: bad settings, a changed job, a job already running; shards left
    incomplete; an output location that refused a write) are one line each, which the
    command prints last; forty lines of traceback above it only bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect_vllm.exceptions import PrefectVllmError

        if record.exc_info and isinstance(record.exc_info[1], PrefectVllmError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_refusals() -> None:
    """Keep refusals' tracebacks out of every log handler Prefect has set up (the console
    and the run's logs on the server): each refusal is still logged, as its message."""
    quiet = _RefusalWithoutTraceback()
    names = ["", *(name for name in logging.root.manager.loggerDict if name.startswith("prefect"))]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _RefusalWithoutTraceback) for f in handler.filters):
                handler.addFilter(quiet)
