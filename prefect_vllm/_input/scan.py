"""Reading an input file once, in bounded memory, for its plan: row counts, ids, the
byte offsets of JSONL shards, and every check a row gets before any engine starts.

JSONL is read line by line, Parquet from its metadata plus the id column, CSV in
record batches. `iter_jsonl_lines` and `parse_jsonl_line` are also the shard
reader's (`prefect_vllm._input.shard_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prefect_vllm._input.openai_batch import endpoint_task, parse_request
from prefect_vllm.exceptions import InputError

if TYPE_CHECKING:
    from prefect_vllm._input.planning import InputColumns

__all__ = ["iter_jsonl_lines", "parse_jsonl_line", "require_prompt", "scan_csv", "scan_jsonl", "scan_parquet"]


def require_prompt(names: list[str], columns: InputColumns, path: str) -> None:
    if columns.prompt not in names and columns.messages not in names:
        raise InputError(
            f"missing prompt column (or {columns.messages!r} column); the input has {names}",
            path=path,
            column=columns.prompt,
        )
    if columns.pair is not None and columns.pair not in names:
        raise InputError(
            f"missing the column of each pair's second text (a scoring job; a rerank job's documents); the input has {names}",
            path=path,
            column=columns.pair,
        )


def iter_jsonl_lines(path: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset, line) for the non-blank lines of a JSONL file's byte range."""
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        for raw in fh:
            if end is not None and pos >= end:
                return
            here = pos
            pos += len(raw)
            if raw.strip():
                yield here, raw


def parse_jsonl_line(raw: bytes, path: str, line: int) -> dict[str, Any]:
    """Parse one JSONL line into an object, naming the file and line when it is malformed."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        col = getattr(exc, "colno", None)
        where = f" at column {col}" if col else ""
        raise InputError(f"malformed JSON{where}: {getattr(exc, 'msg', exc)}", path=path, line=line) from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    return obj


def scan_jsonl(
    path: str, columns: InputColumns, shard_size: int, *, batch: bool
) -> tuple[list[dict[str, int]], int, bool, list[Any]]:
    import pyarrow as pa

    ranges: list[dict[str, int]] = []
    ids: list[Any] = []
    chunk: list[str] = []
    has_id: bool | None = None
    rows = 0
    line_no = 0
    last_end = 0
    first_task: tuple[str, int, Any] | None = None  # an OpenAI Batch file's task, line, url
    with open(path, "rb") as fh:
        pos = 0
        for raw in fh:
            line_no += 1
            here = pos
            pos += len(raw)
            if not raw.strip():
                continue
            obj = parse_jsonl_line(raw, path, line_no)
            if batch:
                chunk.append(parse_request(obj, path=path, line=line_no).custom_id)
                has_id = True
                first_task = _same_task(obj, first_task, path, line_no)
            elif columns.prompt not in obj and columns.messages not in obj:
                raise InputError(
                    f"missing prompt field (or {columns.messages!r})",
                    path=path,
                    line=line_no,
                    column=columns.prompt,
                )
            elif columns.pair is not None and columns.pair not in obj:
                raise InputError(
                    "missing the field of the pair's second text (a scoring job; a rerank job's documents)",
                    path=path,
                    line=line_no,
                    column=columns.pair,
                )
            row_has_id = batch or columns.id in obj
            if has_id is None:
                has_id = row_has_id
            elif row_has_id != has_id:
                raise InputError(
                    "id field missing here but present in earlier rows"
                    if has_id
                    else "id field present here but missing in earlier rows",
                    path=path,
                    line=line_no,
                    column=columns.id,
                )
            if has_id and not batch:
                value = obj[columns.id]
                if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
                    raise InputError(
                        f"id must be a non-empty string or an integer, got {value!r}",
                        path=path,
                        line=line_no,
                        column=columns.id,
                    )
                chunk.append(str(value))
            if len(chunk) >= 65536:
                ids.append(pa.array(chunk, pa.string()))
                chunk = []
            if rows % shard_size == 0:
                if ranges:
                    ranges[-1]["byte_end"] = here
                ranges.append(
                    {
                        "row_start": rows,
                        "num_rows": 0,
                        "byte_start": here,
                        "byte_end": 0,
                        "first_line": line_no,
                    }
                )
            ranges[-1]["num_rows"] += 1
            rows += 1
            last_end = pos
    if ranges:
        ranges[-1]["byte_end"] = last_end
    if chunk:
        ids.append(pa.array(chunk, pa.string()))
    return ranges, rows, bool(has_id), ids


def _same_task(
    request: dict[str, Any], first: tuple[str, int, Any] | None, path: str, line: int
) -> tuple[str, int, Any] | None:
    """The file's task so far, after checking that `request`'s endpoint needs the same."""
    task = endpoint_task(request)
    if task is None:
        return first  # an endpoint not served: that row's error
    if first is None:
        return task, line, request["url"]
    if task != first[0]:
        raise InputError(
            f"a {request['url']} request is for task {task!r}, but line {first[1]}'s ({first[2]}) "
            f"is for {first[0]!r}: one file is one job, of one task",
            path=path,
            line=line,
            column="url",
        )
    return first


def scan_parquet(
    path: str, columns: InputColumns, shard_size: int
) -> tuple[list[dict[str, int]], int, bool, list[Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"not a readable Parquet file: {exc}", path=path) from None
    names = pf.schema_arrow.names
    require_prompt(names, columns, path)
    rows = pf.metadata.num_rows
    has_id = columns.id in names
    ids: list[Any] = []
    if has_id:
        for batch in pf.iter_batches(columns=[columns.id], batch_size=65536):
            ids.append(batch.column(0).cast("string"))
    return ranges_from_counts(rows, shard_size), rows, has_id, ids


def scan_csv(
    path: str, columns: InputColumns, shard_size: int
) -> tuple[list[dict[str, int]], int, bool, list[Any]]:
    import pyarrow.csv as pcsv

    try:
        reader = pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    except Exception as exc:
        raise InputError(f"not a readable CSV file: {exc}", path=path) from None
    names = reader.schema.names
    require_prompt(names, columns, path)
    has_id = columns.id in names
    rows = 0
    ids: list[Any] = []
    try:
        for batch in reader:
            rows += batch.num_rows
            if has_id:
                ids.append(batch.column(columns.id).cast("string"))
    except Exception as exc:
        raise InputError(f"malformed CSV after row {rows}: {exc}", path=path) from None
    return ranges_from_counts(rows, shard_size), rows, has_id, ids


def ranges_from_counts(rows: int, shard_size: int) -> list[dict[str, int]]:
    return [{"row_start": s, "num_rows": min(shard_size, rows - s)} for s in range(0, rows, shard_size)]
