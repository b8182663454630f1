"""`prefect-vllm run`'s answers from the checkpoints alone, before a server, Ray or an
engine starts: another job's output refused, a live run's lock, nothing left to run."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["answer_from_checkpoints"]


def answer_from_checkpoints(args: argparse.Namespace, decision: Any, started: float) -> tuple[Any, bool]:
    """Decide a refusal or a no-op resume from the checkpoints alone: no server, Ray or engine.

    Returns:
        The summary (a `BatchResult`) of a job with nothing to do (every shard of it
        committed in the output), else None: the flow decides; and whether the flow will
        need engines (not for an export of a finished job), so that none start early in vain.

    Raises:
        FingerprintMismatchError: The output holds another job, or this one with
            other settings.
        JobRunningError: A live run holds the job's lock (with --restart too: a restart
            discards the checkpoints of a job nobody is writing).
    """
    from prefect_vllm._store.checkpoint import CheckpointStore

    if decision is None:  # only the flow can tell which job this is
        return None, True
    store = CheckpointStore(args.output)
    with store.storage_errors(action="read"):
        return answer_from_store(store, args, decision.identity, started)


def answer_from_store(
    store: Any, args: argparse.Namespace, identity: Any, started: float
) -> tuple[Any, bool]:
    """`answer_from_checkpoints` once the output location is open."""
    from prefect_vllm._job import job_summary
    from prefect_vllm._store.lock import check_not_running

    manifest = store.read_manifest()
    if manifest is None:
        return None, True
    if args.restart:
        check_not_running(store)
        return None, True
    with refusal_event(identity.job_id, args.model, store.uri):
        store.check_same_job(manifest, identity.job_id, identity.fingerprint)
        check_not_running(store)
    committed = store.committed()
    if any(s.shard_id not in committed for s in manifest.plan.shards):
        return None, True  # shards to run: the flow's work
    if store.damaged(committed, checksums=args.verify):
        return None, True  # committed parts to repair: the flow names them and runs them again
    if args.export:
        return None, False  # the flow writes the export again, from the part files alone
    print(
        f"prefect-vllm: job {manifest.job_id}: every shard is already committed in {store.uri}; "
        "nothing to run",
        file=sys.stderr,
    )
    done = job_summary(
        manifest.job_id, manifest.plan, committed, {}, store.uri, wall_s=time.monotonic() - started
    )
    return done, False


@contextlib.contextmanager
def refusal_event(job_id: str, model: str, output: str) -> Iterator[None]:
    """Emit `job.refused` for a refusal decided here, when a Prefect server is configured
    (with none, the refusal comes before any server starts: nothing could receive it)."""
    from prefect_vllm.exceptions import FingerprintMismatchError, JobRunningError

    try:
        yield
    except (FingerprintMismatchError, JobRunningError) as exc:
        if os.environ.get("PREFECT_API_URL"):
            from prefect.events.worker import EventsWorker

            from prefect_vllm.flows._events import JobEvents

            JobEvents(job_id, model, output).refused(str(exc))
            EventsWorker.drain_all(timeout=10)
        raise
