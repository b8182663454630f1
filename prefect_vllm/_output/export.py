"""`--export openai`: the committed part files as OpenAI Batch `output.jsonl` and `errors.jsonl`.

Written at the end of every run from the part files alone, in plan order, so the
export of a resumed job holds each `custom_id` exactly once, like the parts, and
the same ids and `created` times as an export of an uninterrupted run.
"""

from __future__ import annotations

import json
from typing import Any

from prefect_vllm._columns import CUSTOM_ID, ERROR
from prefect_vllm._engine.isolation import poison_message
from prefect_vllm._job_tasks import job_task
from prefect_vllm._output.openai import error_line
from prefect_vllm._store.checkpoint import EXPORTS, CheckpointStore
from prefect_vllm.results import ShardResult

__all__ = ["OUTPUT_FILE", "ERRORS_FILE", "export_openai"]

OUTPUT_FILE = f"{EXPORTS}/output.jsonl"
ERRORS_FILE = f"{EXPORTS}/errors.jsonl"

#: Where poison messages start: a row that killed the engine is a server error, not a bad request.
_POISON_PREFIX = poison_message(1).split(":")[0]


def export_openai(
    store: CheckpointStore, shards: list[ShardResult], *, job_id: str, model: str, task: str = "generate"
) -> dict[str, int]:
    """Write both export files from the given committed shards, in the order given.

    Args:
        store: The job's output location.
        shards: The committed shards, in plan order.
        job_id: The job's id: response ids derive from it and each `custom_id`.
        model: The model name written into each response body.
        task: The job's task: its entry's `response_line` writes each response
            (completions, embeddings, rerank results).

    Returns:
        OpenAI's `request_counts`: `total`, `completed`, `failed`.

    Raises:
        ConfigurationError: The task has no OpenAI export.
    """
    entry = job_task(task)
    response_line = entry.response_line
    if response_line is None:
        from prefect_vllm.exceptions import ConfigurationError

        raise ConfigurationError(entry.refusal("export") or "export: not for this task")
    completed = failed = 0
    with store.open_output(OUTPUT_FILE) as out, store.open_output(ERRORS_FILE) as errors:
        for shard in shards:
            created = int(shard.committed_at)
            for row in store.read_part(shard.shard_id).to_pylist():
                if row[ERROR] is None:
                    out.write(_jsonl(response_line(row, model=model, job_id=job_id, created=created)))
                    completed += 1
                else:
                    code = "server_error" if row[ERROR].startswith(_POISON_PREFIX) else "invalid_request"
                    errors.write(_jsonl(error_line(row[CUSTOM_ID], row[ERROR], job_id=job_id, code=code)))
                    failed += 1
    return {"total": completed + failed, "completed": completed, "failed": failed}


def _jsonl(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()
