"""The Prefect events a run emits, for automations to react to; the job is their resource.

Every event's resource is `prefect-vllm.job.<job_id>`; its related resources are the
model (role `model`) and the output location (role `output`), and Prefect adds the
flow run, flow and deployment of the run that emits it. Payloads hold counts, ids and
seconds, never a prompt or generated text. The README's "Events" section lists them.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect_vllm.results import BatchResult, ShardResult

logger = logging.getLogger("prefect_vllm.events")

#: Every event name starts with this.
PREFIX = "prefect-vllm"


def job_resource_id(job_id: str) -> str:
    """The resource id of a job's events."""
    return f"{PREFIX}.job.{job_id}"


class JobEvents:
    """Emits one job's events; a failure to emit is logged, never raised.

    Args:
        job_id: The job's id.
        model: The model the job generates with (a Hugging Face id or a path).
        output: The output location's URI.
    """

    def __init__(self, job_id: str, model: str, output: str) -> None:
        self.job_id = job_id
        self._resource = {
            "prefect.resource.id": job_resource_id(job_id),
            "prefect.resource.name": job_id,
        }
        self._related = [
            {"prefect.resource.id": f"{PREFIX}.model.{model}", "prefect.resource.role": "model",
             "prefect.resource.name": model},
            {"prefect.resource.id": f"{PREFIX}.output.{output}", "prefect.resource.role": "output",
             "prefect.resource.name": output},
        ]  # fmt: skip

    def emit(self, name: str, payload: dict[str, Any]) -> None:
        """Emit `prefect-vllm.<name>` with `payload` (the job id is always in it)."""
        from prefect.events import emit_event

        try:
            emit_event(
                event=f"{PREFIX}.{name}",
                resource=self._resource,
                related=self._related,
                payload={"job_id": self.job_id, **payload},
            )
        except Exception as exc:  # an event is never worth a run
            logger.warning("could not emit the %s.%s event: %s", PREFIX, name, exc)

    def started(self, shards_total: int, shards_to_run: int, rows_total: int) -> None:
        """`job.started`: the job's plan, and how much of it this run has to do."""
        self.emit(
            "job.started",
            {"shards_total": shards_total, "shards_to_run": shards_to_run, "rows_total": rows_total},
        )

    def shard_committed(self, result: ShardResult) -> None:
        """`shard.committed`, and a `row.poisoned` for each poison row committed as an error."""
        self.emit(
            "shard.committed",
            {
                "shard_id": result.shard_id, "rows": result.rows, "rows_ok": result.rows_ok,
                "rows_failed": result.rows_failed, "output_tokens": result.output_tokens,
                "attempt": result.attempt, "engine_deaths": result.engine_deaths, "seconds": round(result.total_s, 3),
            },
        )  # fmt: skip
        for custom_id in result.poisoned_rows:
            self.emit("row.poisoned", {"custom_id": custom_id, "shard_id": result.shard_id})

    def engine_died(
        self, actor: int, actor_restarts: int, run_restarts: int, shards_in_flight: list[str]
    ) -> None:
        """`engine.died`: Ray restarted an actor because its engine died (or the actor did).

        Which shard is blamed is known once the shards in flight on it commit: a shard
        whose call the death interrupted counts it in its `shard.committed` event's
        `engine_deaths` (and its rows may be retried alone, see `row.poisoned`).
        """
        self.emit(
            "engine.died",
            {
                "actor": actor, "actor_restarts": actor_restarts, "run_restarts": run_restarts,
                "shards_in_flight": shards_in_flight,
            },
        )  # fmt: skip

    def finished(self, summary: BatchResult) -> None:
        """`job.completed` when every shard is committed, else `job.failed`."""
        payload = {
            "rows_total": summary.rows_total, "rows_ok": summary.rows_ok, "rows_failed": summary.rows_failed,
            "shards_total": summary.shards_total, "shards_run": summary.shards_run,
            "shards_skipped": summary.shards_skipped, "output_tokens": summary.output_tokens,
            "engine_restarts": summary.engine_restarts, "poisoned_rows": len(summary.poisoned_rows),
            "seconds": round(summary.wall_s, 3), "output": summary.output,
        }  # fmt: skip
        if not summary.shards_incomplete:
            self.emit("job.completed", payload)
            return
        reason = summary.stopped_by or "some shards were not committed; run the job again to resume"
        self.emit(
            "job.failed",
            {**payload, "shards_incomplete": summary.shards_incomplete[:100],
             "shards_incomplete_count": len(summary.shards_incomplete), "reason": reason},
        )  # fmt: skip

    def refused(self, reason: str) -> None:
        """`job.refused`: another job's output, other settings, or a run in progress."""
        self.emit("job.refused", {"reason": reason})


def asset_key(location: str) -> str:
    """A location as a Prefect asset key: a URI (`file://` for a local path), with the
    characters asset keys refuse (spaces, `#`, `?`, `%`, quotes ...) replaced by `_`."""
    import os

    from prefect.types.names import RESTRICTED_ASSET_CHARACTERS

    uri = location if "://" in location else f"file://{os.path.abspath(location)}"
    for char in RESTRICTED_ASSET_CHARACTERS:
        uri = uri.replace(char, "_")
    return uri


def materialize_output(input: str, summary: BatchResult, model: str) -> None:
    """Record the job's output as a Prefect asset materialized by this run, with the input
    as its upstream asset, so Prefect's lineage shows input -> job -> output.

    Called for a completed job only: an output with shards missing is not materialized.
    The materialization is a small task run of the flow (`materialize-output`).
    """
    from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize

    output = Asset(
        key=asset_key(summary.output),
        properties=AssetProperties(
            name=f"prefect-vllm job {summary.job_id}",
            description=f"Generated by {model} for every row of {input}; part files and commit markers.",
        ),
    )
    metadata = {
        "job_id": summary.job_id, "model": model, "rows": summary.rows_total, "rows_ok": summary.rows_ok,
        "rows_failed": summary.rows_failed, "shards": summary.shards_total, "output_tokens": summary.output_tokens,
    }  # fmt: skip

    @materialize(output, asset_deps=[asset_key(input)], by="prefect-vllm", name="materialize-output")
    def record() -> None:
        add_asset_metadata(output, metadata)

    try:
        record()
    except Exception as exc:  # lineage is never worth a run
        logger.warning("could not record the output asset %s: %s", output.key, exc)
