"""One shard's output table, in its task's column order and Arrow types."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect_vllm._columns import CUSTOM_ID
from prefect_vllm._job_tasks import job_task

if TYPE_CHECKING:
    import pyarrow as pa

    from prefect_vllm._input.requests import RowRequest

__all__ = ["output_table"]


def output_table(rows: list[RowRequest], generated: dict[str, Any], task: str = "generate") -> pa.Table:
    """The shard's part-file table: each row's id, the engine's columns for it
    (`generated`, the task's `row_columns`) and the columns its request carries
    (`row_extras`: a generated row's `kind`, an embedding's `encoding_format`).
    """
    import pyarrow as pa

    entry = job_task(task)
    columns: dict[str, list[Any]] = {CUSTOM_ID: [r.custom_id for r in rows]}
    columns.update({name: generated[name] for name in entry.row_columns})
    columns.update({name: [getattr(r, attr) for r in rows] for name, attr in entry.row_extras.items()})
    return pa.Table.from_pydict(columns, schema=entry.schema())
