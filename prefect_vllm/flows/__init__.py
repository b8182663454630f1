"""Thin orchestration: the `batch_inference` flow."""

import os

# A flow called with no Prefect API configured runs against a temporary server that
# Prefect starts for it. That server's telemetry heartbeat logs an error with a
# traceback when it cannot reach the internet, or when the run's own writes hold its
# SQLite file ("database is locked"): off, unless the user says otherwise. Set before
# Prefect loads its settings, and inherited by the server process.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect_vllm.flows.batch import batch_inference

__all__ = ["batch_inference"]


def __getattr__(name: str) -> Any:
    """`batch_inference` imports Prefect (a second): loaded when asked for, so that the
    command's own checks (`flows._resolve`) refuse bad usage without it."""
    if name == "batch_inference":
        from prefect_vllm.flows.batch import batch_inference

        return batch_inference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
