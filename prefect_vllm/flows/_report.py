"""What a run shows while it goes and when it ends: Prefect artifacts and a terminal bar.

Artifacts are reporting, never the job: a failure to create one is logged and the
run goes on.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

from prefect_vllm._job_tasks import job_task
from prefect_vllm.results import BatchResult, ShardResult

logger = logging.getLogger("prefect_vllm.flow")

#: The progress artifact is updated at most this often: each update is an API call
#: made from the loop that feeds the engines.
PROGRESS_EVERY_S = 2.0

#: Shards listed in the table artifact; a larger job lists its first ones and says so.
TABLE_ROWS = 1000


def artifact_key(job_id: str, kind: str) -> str:
    """A Prefect artifact key for the job (lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"prefect-vllm-{job_id}-{kind}".lower()).strip("-")


class Progress:
    """Shards committed out of the job's total: a progress artifact, and a bar on a terminal.

    Args:
        job_id: The job's id.
        total: Shards in the job.
        done: Shards already committed when the run starts.
    """

    def __init__(self, job_id: str, total: int, done: int) -> None:
        self._total, self._done = max(total, 1), done
        self._artifact = _quietly(
            "create the progress artifact",
            lambda: _create_progress(job_id, 100.0 * done / self._total, self._describe()),
        )
        self._bar: Any = None  # drawn from the first commit: its rate and ETA count from there
        self._rows = self._errors = 0  # committed by this run
        self._unpatch: list[tuple[logging.Handler, Any]] = []
        self._updated = time.monotonic()

    def _describe(self) -> str:
        return f"{self._done} of {self._total} shards committed"

    def commit(self, result: ShardResult) -> None:
        """Count one more committed shard."""
        self._done += 1
        self._rows, self._errors = self._rows + result.rows, self._errors + result.rows_failed
        if self._bar is None and not self._unpatch:
            # Drawn with this first commit counted: its rate and ETA run from here, not
            # from one shard over the instant since the bar appeared.
            self._bar = _terminal_bar(self._total, self._done)
            if self._bar is not None:
                self._unpatch = _log_above(self._bar)
                self._bar.set_postfix(rows=self._rows, errors=self._errors)
        elif self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(rows=self._rows, errors=self._errors, refresh=False)
        artifact = self._artifact
        now = time.monotonic()
        if artifact is not None and (now - self._updated >= PROGRESS_EVERY_S or self._done >= self._total):
            self._updated = now
            _quietly(
                "update the progress artifact",
                lambda: _update_progress(artifact, 100.0 * self._done / self._total, self._describe()),
            )

    def close(self) -> None:
        """End the terminal bar."""
        for handler, emit in self._unpatch:
            handler.emit = emit  # type: ignore[method-assign]
        if self._bar is not None:
            self._bar.close()


def _log_above(bar: Any) -> list[tuple[logging.Handler, Any]]:
    """Log lines go above the bar: each console handler clears it, writes, redraws it.

    Returns:
        The handlers changed and their own `emit`, to put back.
    """
    changed: list[tuple[logging.Handler, Any]] = []
    names = ["", *(name for name in logging.root.manager.loggerDict if name.startswith("prefect"))]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.StreamHandler) or any(h is handler for h, _ in changed):
                continue
            emit = handler.emit

            def above(record: logging.LogRecord, emit: Any = emit) -> None:
                with bar.external_write_mode():
                    emit(record)

            handler.emit = above  # type: ignore[method-assign]
            changed.append((handler, emit))
    return changed


def publish_results(
    summary: BatchResult,
    results: dict[str, ShardResult],
    rerun: str,
    *,
    task: str = "generate",
    rows_run: int = 0,
) -> None:
    """The per-shard table and the markdown summary of the run, as Prefect artifacts.

    Args:
        summary: The run's summary.
        results: Every committed shard of the job, by id.
        rerun: How to resume or re-run the job, for the summary.
        task: The job's task: a generation job's rates are tokens, the others' rows.
        rows_run: Rows of the shards this run committed.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [
        {
            "shard": r.shard_id,
            "rows": r.rows,
            "failed rows": r.rows_failed,
            "attempt": r.attempt,
            "engine deaths": r.engine_deaths,
            "seconds": round(r.total_s, 2),
            **(
                {"tokens/s": round(r.output_tokens / r.generate_s, 1) if r.generate_s else 0.0}
                if job_task(task).samples
                else {"rows/s": round(r.rows / r.generate_s, 1) if r.generate_s else 0.0}
            ),
        }
        for _, r in sorted(results.items())[:TABLE_ROWS]
    ]
    shown = "" if len(results) <= TABLE_ROWS else f" (the first {TABLE_ROWS} of {len(results)})"
    _quietly(
        "create the shard table",
        lambda: create_table_artifact(
            rows,
            key=artifact_key(summary.job_id, "shards"),
            description=f"Committed shards of the job{shown}.",
        ),
    )
    _quietly(
        "create the summary",
        lambda: create_markdown_artifact(
            summary_markdown(summary, rerun, task=task, rows_run=rows_run),
            key=artifact_key(summary.job_id, "summary"),
            description="prefect-vllm run summary.",
        ),
    )


def _throughput(summary: BatchResult, task: str, rows_run: int) -> list[str]:
    """Tokens generated and their rate; for a job that generates none (embeddings, classes,
    scores, rankings), the rows this run committed per second."""
    if job_task(task).samples:
        return [
            f"| generated tokens | {summary.output_tokens} |",
            f"| throughput | {summary.tokens_per_s:.1f} tokens/s end to end, "
            f"{summary.generation_tokens_per_s:.1f} while generating |",
        ]
    end_to_end = rows_run / summary.wall_s if summary.wall_s else 0.0
    running = rows_run / summary.generation_s if summary.generation_s else 0.0
    return [f"| throughput | {end_to_end:.1f} rows/s end to end, {running:.1f} while running |"]


def summary_markdown(summary: BatchResult, rerun: str, *, task: str = "generate", rows_run: int = 0) -> str:
    """The run summary as markdown: totals, throughput (tokens for a generation `task`, else
    the `rows_run` by this run), where the output is, how to resume."""
    state = (
        "complete"
        if not summary.shards_incomplete
        else f"**incomplete**: {len(summary.shards_incomplete)} shards not committed"
    )
    lines = [
        f"# prefect-vllm job `{summary.job_id}`: {state}",
        "",
        "| | |",
        "| --- | --- |",
        f"| rows | {summary.rows_total} ({summary.rows_ok} ok, {summary.rows_failed} row errors) |",
        f"| shards | {summary.shards_total} ({summary.shards_run} run now, {summary.shards_skipped} "
        "committed before) |",
        f"| engine restarts | {summary.engine_restarts} |",
        *_throughput(summary, task, rows_run),
        f"| wall time | {summary.wall_s:.1f} s |",
        f"| output | `{summary.output}` |",
    ]
    if summary.request_counts:
        counts = summary.request_counts
        lines.append(
            f"| OpenAI export | {counts['completed']} completed, {counts['failed']} failed "
            f"(`{summary.output}/_openai/`) |"
        )
    if summary.poisoned_rows:
        lines.append(f"| poison rows | {', '.join(summary.poisoned_rows[:20])} |")
    lines += ["", f"To resume or re-run: {rerun}"]
    return "\n".join(lines) + "\n"


def _create_progress(job_id: str, progress: float, description: str) -> Any:
    from prefect.artifacts import create_progress_artifact

    return create_progress_artifact(progress, key=artifact_key(job_id, "progress"), description=description)


def _update_progress(artifact: Any, progress: float, description: str) -> Any:
    from prefect.artifacts import update_progress_artifact

    return update_progress_artifact(artifact, progress, description=description)


def _quietly(what: str, action: Any) -> Any:
    try:
        return action()
    except Exception as exc:  # reporting must never fail the job
        logger.warning("could not %s: %s", what, exc)
        return None


def _terminal_bar(total: int, done: int) -> Any:
    """A tqdm bar on stderr when it is a terminal; None otherwise (logs, CI, Prefect workers)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="shard", desc="shards", file=sys.stderr)
