"""Reading one shard's rows on a Ray worker, as its task's requests."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prefect_vllm._columns import MODEL, SAMPLING_PARAMS
from prefect_vllm._input.openai_batch import parse_request
from prefect_vllm._input.planning import InputColumns, ShardSpec
from prefect_vllm._input.requests import RowRequest, plain_row
from prefect_vllm._input.scan import iter_jsonl_lines, parse_jsonl_line
from prefect_vllm._job_tasks import JobTask, job_task

if TYPE_CHECKING:
    import pyarrow as pa


def read_shard(
    spec: ShardSpec,
    columns: InputColumns,
    has_id: bool,
    adapters: Mapping[str, str] | None = None,
    task: str = "generate",
) -> list[RowRequest]:
    """The shard's rows as requests of a `task` job, read straight from the input file.

    Rows that cannot be served (an unsupported endpoint, an unknown sampling key)
    come back with their error set: they are committed as row errors. With LoRA
    `adapters`, a row whose model names one is generated with it.
    """
    rows = _read_rows(spec, columns, has_id, adapters is not None, job_task(task))
    if adapters is None:
        return rows
    return [r.with_adapter(adapters, strict=spec.format != "openai") for r in rows]


def _read_rows(
    spec: ShardSpec, columns: InputColumns, has_id: bool, with_model: bool, entry: JobTask
) -> list[RowRequest]:
    pair = columns.pair if entry.build_row is not None else None
    if spec.format in ("jsonl", "openai"):
        rows: list[RowRequest] = []
        line = spec.first_line
        for _offset, raw in iter_jsonl_lines(spec.path, spec.byte_start, spec.byte_end):
            obj = parse_jsonl_line(raw, spec.path, line)
            if spec.format == "openai":
                rows.append(parse_request(obj, path=spec.path, line=line))
            else:
                row = plain_row(
                    obj.get(columns.prompt),
                    obj.get(columns.messages),
                    obj.get(SAMPLING_PARAMS),
                    model=obj.get(MODEL) if with_model else None,
                )
                if pair is not None and entry.build_row is not None:
                    extra = {name: obj.get(name) for name in entry.extra_columns}
                    row = entry.build_row(row, obj.get(pair), pair, extra)
                rows.append(dataclasses.replace(row, custom_id=str(obj[columns.id]) if has_id else ""))
            line += 1
        if not has_id:
            rows = [
                dataclasses.replace(r, custom_id=i) for r, i in zip(rows, _position_ids(spec), strict=True)
            ]
        return rows
    names = _read_schema_names(spec)
    wanted = [
        n
        for n in (columns.prompt, columns.messages, SAMPLING_PARAMS, MODEL, pair, *entry.extra_columns)
        if n in names
    ]
    if not with_model and MODEL in wanted:
        wanted.remove(MODEL)
    table = _read_table_range(spec, wanted + ([columns.id] if has_id else []))
    ids = table.column(columns.id).cast("string").to_pylist() if has_id else _position_ids(spec)
    empty = [None] * table.num_rows

    def column(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in wanted else empty

    rows = [
        plain_row(prompt, messages, sampling, custom_id=cid, model=model)
        for cid, prompt, messages, sampling, model in zip(
            ids,
            column(columns.prompt),
            column(columns.messages),
            column(SAMPLING_PARAMS),
            column(MODEL),
            strict=True,
        )
    ]
    if pair is None or entry.build_row is None:
        return rows
    build = entry.build_row
    extras = [column(name) for name in entry.extra_columns]
    return [
        build(r, p, pair, dict(zip(entry.extra_columns, values, strict=True)))
        for r, p, *values in zip(rows, column(pair), *extras, strict=True)
    ]


def _read_schema_names(spec: ShardSpec) -> list[str]:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if spec.format == "parquet":
        return list(pq.read_schema(spec.path).names)
    return list(pcsv.open_csv(spec.path).schema.names)


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
