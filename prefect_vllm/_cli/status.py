"""`prefect-vllm status`: a job's progress, or every job in a folder, from the checkpoints alone."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect_vllm._cli.common import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, add_output_arguments, output_store
from prefect_vllm._cli.common import fail as _fail
from prefect_vllm._store.checkpoint import CheckpointStore


def add_status_parser(sub: Any) -> None:
    """The `status` subcommand's flags."""
    status = sub.add_parser(
        "status", help="progress of a job, or of every job in a folder, from its checkpoints alone"
    )
    add_output_arguments(status, "the job's output folder or URI, or a folder of jobs' outputs")
    status.add_argument("--json", action="store_true", help="one JSON object (a folder of jobs: a list)")
    status.add_argument(
        "--verify", action="store_true", help="also read every part file and check its sha256"
    )


def status(args: argparse.Namespace) -> int:
    """Print the job's progress; exit 0 when done, 1 with shards pending, 2 when no job is there.

    An output location with no job of its own is read as a folder of jobs: each folder
    directly under it that holds one is reported, one line (or object) per job.
    """
    from prefect_vllm.exceptions import ConfigurationError, StorageError

    try:
        store = output_store(args.output, args.storage)
        with store.storage_errors(action="read"):
            one = job_status(store, verify=args.verify)
            jobs = [one] if one is not None else _jobs_under(store, args.verify)
    except (ConfigurationError, StorageError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    if not jobs:
        return _fail(
            f"{store.uri} holds no prefect-vllm job (no _manifest.json there or in a folder under it)",
            EXIT_USAGE,
        )
    if args.json:
        print(json.dumps(jobs[0] if one is not None else jobs))
    else:
        for job in jobs:
            where = "" if one is not None else f" in {job['output']}"
            print(
                f"job {job['job_id']}{where}: {job['shards_done']}/{job['shards_total']} shards done, "
                f"{job['shards_pending']} pending; {job['rows_ok']} rows ok, "
                f"{job['rows_failed']} row errors of {job['rows_total']}"
            )
            for shard_id, problem in job["damaged"].items():
                print(f"shard {shard_id} is damaged ({problem}): the next run generates it again")
    return EXIT_OK if all(job["shards_pending"] == 0 for job in jobs) else EXIT_INCOMPLETE


def job_status(store: CheckpointStore, *, verify: bool = False) -> dict[str, Any] | None:
    """One job's progress from its manifest and commit markers; None if `store` holds no job."""
    manifest = store.read_manifest()
    if manifest is None:
        return None
    committed = store.committed()
    damaged = store.damaged(committed, checksums=verify)
    for shard_id in damaged:
        del committed[shard_id]
    shards = [s.shard_id for s in manifest.plan.shards]
    pending = [s for s in shards if s not in committed]
    return {
        "job_id": manifest.job_id,
        "output": store.uri,
        "shards_total": len(shards),
        "shards_done": len(shards) - len(pending),
        "shards_pending": len(pending),
        "rows_total": manifest.plan.rows_total,
        "rows_ok": sum(r.rows_ok for r in committed.values()),
        "rows_failed": sum(r.rows_failed for r in committed.values()),
        "pending": pending[:100],
        "damaged": damaged,
    }


def _jobs_under(store: CheckpointStore, verify: bool) -> list[dict[str, Any]]:
    """The status of each job in a folder directly under `store`, by folder name."""
    import pyarrow.fs as pafs

    found = []
    for info in sorted(
        store.fs.get_file_info(pafs.FileSelector(store.root, allow_not_found=True)), key=lambda i: i.path
    ):
        if info.type != pafs.FileType.Directory:
            continue
        job = job_status(store.child(info.base_name), verify=verify)
        if job is not None:
            found.append(job)
    return found
