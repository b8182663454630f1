"""Reading one shard's rows on a Ray worker, and shaping its output table."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from prefect_vllm._columns import (
    COMPLETION_TOKENS,
    CUSTOM_ID,
    ERROR,
    FINISH_REASON,
    PROMPT_TOKENS,
    TEXT,
    output_schema,
)
from prefect_vllm._planning import InputColumns, ShardSpec, iter_jsonl_lines, parse_jsonl_line

if TYPE_CHECKING:
    import pyarrow as pa


def read_shard(spec: ShardSpec, columns: InputColumns, has_id: bool) -> tuple[list[str], list[Any]]:
    """The shard's custom ids and prompts, read straight from the input file."""
    if spec.format == "jsonl":
        ids: list[str] = []
        prompts: list[Any] = []
        line = spec.first_line
        for _offset, raw in iter_jsonl_lines(spec.path, spec.byte_start, spec.byte_end):
            obj = parse_jsonl_line(raw, spec.path, line)
            prompts.append(obj.get(columns.prompt))
            ids.append(str(obj[columns.id]) if has_id else "")
            line += 1
        if not has_id:
            ids = _position_ids(spec)
        return ids, prompts
    table = _read_table_range(spec, [columns.prompt, columns.id] if has_id else [columns.prompt])
    prompts = table.column(columns.prompt).to_pylist()
    ids = table.column(columns.id).cast("string").to_pylist() if has_id else _position_ids(spec)
    return ids, prompts


def _position_ids(spec: ShardSpec) -> list[str]:
    return [str(spec.row_offset + i) for i in range(spec.num_rows)]


def _read_table_range(spec: ShardSpec, names: list[str]) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    end = spec.row_start + spec.num_rows
    batches = []
    seen = 0
    if spec.format == "parquet":
        pf = pq.ParquetFile(spec.path)
        groups: list[int] = []
        first = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if seen + n > spec.row_start and seen < end:
                if not groups:
                    first = seen
                groups.append(g)
            seen += n
        table = pf.read_row_groups(groups, columns=names)
        return table.slice(spec.row_start - first, spec.num_rows)
    reader = pcsv.open_csv(
        spec.path,
        convert_options=pcsv.ConvertOptions(include_columns=names, strings_can_be_null=False),
    )
    for batch in reader:
        lo, hi = max(spec.row_start - seen, 0), min(end - seen, batch.num_rows)
        if lo < hi:
            batches.append(batch.slice(lo, hi - lo))
        seen += batch.num_rows
        if seen >= end:
            break
    return pa.Table.from_batches(batches, schema=reader.schema)


def row_seeds(job_seed: int, custom_ids: list[str]) -> list[int]:
    """Per-row seeds from the job seed and each custom id: retries sample the same way."""
    prefix = f"{job_seed}:".encode()
    return [
        int.from_bytes(hashlib.blake2b(prefix + cid.encode(), digest_size=8).digest(), "big") >> 1
        for cid in custom_ids
    ]


def output_table(custom_ids: list[str], generated: dict[str, Any]) -> pa.Table:
    """The shard's output table in the contract's column order and types."""
    import pyarrow as pa

    return pa.Table.from_pydict(
        {
            CUSTOM_ID: custom_ids,
            TEXT: generated[TEXT],
            FINISH_REASON: generated[FINISH_REASON],
            PROMPT_TOKENS: generated[PROMPT_TOKENS],
            COMPLETION_TOKENS: generated[COMPLETION_TOKENS],
            ERROR: generated[ERROR],
        },
        schema=output_schema(),
    )
