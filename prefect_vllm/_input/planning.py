"""Planning: input files into deterministic shards, validated before any engine starts.

Shards are row ranges of one input file. Their ids depend only on the input and the
shard size. Planning streams the input (it never holds the dataset): JSONL is read
line by line, Parquet from its metadata plus the id column, CSV in record batches.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from prefect_vllm._columns import CUSTOM_ID, MESSAGES
from prefect_vllm._input.openai_batch import endpoint_task, looks_like_batch
from prefect_vllm._input.scan import (
    iter_jsonl_lines,
    parse_jsonl_line,
    require_prompt,
    scan_csv,
    scan_jsonl,
    scan_parquet,
)
from prefect_vllm._job_tasks import JobTask
from prefect_vllm.exceptions import InputError

#: `openai` is a JSONL file of OpenAI Batch requests (`{custom_id, method, url, body}`).
Format = Literal["jsonl", "openai", "parquet", "csv"]

_SUFFIXES: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}


class InputFile(BaseModel):
    """One input file and its identity (part of the job fingerprint)."""

    model_config = ConfigDict(frozen=True)

    path: str
    format: Format
    size: int
    mtime_ns: int
    rows: int = 0


class ShardSpec(BaseModel):
    """One shard: a row range of one input file. Moves between processes; holds no rows.

    Attributes:
        shard_id: Stable id, also the part file's name (`part-<shard_id>.parquet`).
        path: The input file.
        format: The input file's format.
        row_start: First row of the range, 0-based within the file.
        num_rows: Rows in the range.
        row_offset: Global position of the first row (ids when there is no id column).
        byte_start: For JSONL, the byte offset of the range's first line.
        byte_end: For JSONL, the byte offset just past the range's last line.
        first_line: For JSONL, the 1-based line number of the range's first line.
    """

    model_config = ConfigDict(frozen=True)

    shard_id: str
    path: str
    format: Format
    row_start: int
    num_rows: int
    row_offset: int
    byte_start: int = 0
    byte_end: int = 0
    first_line: int = 1


class InputColumns(BaseModel):
    """Which input columns hold the prompt, the chat messages, the row id, and for a
    scoring job the second text of each pair.

    A row needs a prompt or messages; a row with non-null messages is a chat row.
    A scoring job's rows need the `pair` column too (None for other jobs). OpenAI
    Batch files ignore these names: their requests say it all.
    """

    model_config = ConfigDict(frozen=True)

    prompt: str = "prompt"
    messages: str = MESSAGES
    id: str = CUSTOM_ID
    pair: str | None = None

    @classmethod
    def of_task(
        cls,
        task: JobTask,
        *,
        prompt: str | None = None,
        messages: str = MESSAGES,
        id: str = CUSTOM_ID,
        pair: str | None = None,
    ) -> InputColumns:
        """The columns a job of `task` reads: the names given, else its entry's defaults
        (a rerank job's `query` and `documents`).

        Raises:
            ConfigurationError: A second column is named for a task that reads none.
        """
        if pair is not None and task.pair_column is None:
            from prefect_vllm.exceptions import ConfigurationError

            raise ConfigurationError(task.refusal("pair_column", "pair_column") or "pair_column")
        return cls(
            prompt=prompt or task.text_column,
            messages=messages,
            id=id,
            pair=(pair or task.pair_column) if task.pair_column is not None else None,
        )


class JobPlan(BaseModel):
    """The planned job: input files, shards, and whether the id column exists."""

    files: list[InputFile]
    shards: list[ShardSpec]
    rows_total: int
    has_id_column: bool


def discover_inputs(spec: str) -> list[InputFile]:
    """The input files named by a file, a folder or a glob, sorted by path.

    Raises:
        InputError: Nothing matches, or a file has an unknown suffix.
    """
    if any(ch in spec for ch in "*?["):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
        paths = sorted(
            os.path.join(root, name)
            for root, _dirs, names in os.walk(spec)
            for name in names
            if not name.startswith((".", "_")) and os.path.splitext(name)[1].lower() in _SUFFIXES
        )
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        raise InputError(f"input: {spec} is no file, folder or glob that exists")
    if not paths:
        raise InputError(f"input: {spec} holds no input files (.jsonl, .parquet, .csv)")
    files = []
    for p in paths:
        fmt = _SUFFIXES.get(os.path.splitext(p)[1].lower())
        if fmt is None:
            raise InputError(f"unknown input format; use one of {', '.join(sorted(_SUFFIXES))}", path=p)
        if fmt == "jsonl" and _is_batch_file(p):
            fmt = "openai"
        st = os.stat(p)
        files.append(InputFile(path=os.path.abspath(p), format=fmt, size=st.st_size, mtime_ns=st.st_mtime_ns))
    return files


def _is_batch_file(path: str) -> bool:
    """Whether a JSONL file holds OpenAI Batch requests, judged by its first line."""
    for _offset, raw in iter_jsonl_lines(path):
        try:
            return looks_like_batch(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False  # planning names the malformed line
    return False


def input_task(files: list[InputFile]) -> str | None:
    """The job task that the input's OpenAI Batch requests need (`generate`, `embed`), by
    the first served endpoint of each such file; None when the input has none.

    Planning checks every other line (`plan_job`).

    Raises:
        InputError: Two files' requests need different tasks (naming the second file).
    """
    needed: tuple[str, str] | None = None
    for f in files:
        if f.format != "openai":
            continue
        task = _first_task(f.path)
        if task is None:
            continue
        if needed is not None and task != needed[0]:
            raise InputError(
                f"its requests are for task {task!r}, but those of {needed[1]} are for "
                f"{needed[0]!r}: one job has one task",
                path=f.path,
                column="url",
            )
        needed = needed or (task, f.path)
    return needed[0] if needed else None


def _first_task(path: str) -> str | None:
    for _offset, raw in iter_jsonl_lines(path):
        try:
            task = endpoint_task(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # planning names the malformed line
        if task is not None:
            return task
    return None


def check_columns(input_spec: str, columns: InputColumns) -> None:
    """A quick look before anything starts: the first input file has the prompt column.

    Only the first row (JSONL) or the schema (Parquet, CSV) is read; `plan_job`
    validates every row later.

    Raises:
        InputError: No input, or the prompt column is missing.
    """
    first = discover_inputs(input_spec)[0]
    if first.format == "openai":
        return
    if first.format == "jsonl":
        for line_no, (_offset, raw) in enumerate(iter_jsonl_lines(first.path), start=1):
            names = list(parse_jsonl_line(raw, first.path, line_no))
            break
        else:
            return
    elif first.format == "parquet":
        names = _scan_schema(first.path)
    else:
        import pyarrow.csv as pcsv

        try:
            names = pcsv.open_csv(first.path).schema.names
        except Exception as exc:
            raise InputError(f"not a readable CSV file: {exc}", path=first.path) from None
    require_prompt(names, columns, first.path)


def _scan_schema(path: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:
        raise InputError(f"not a readable Parquet file: {exc}", path=path) from None


#: The last plan made in this process, by what it was made from: the command plans the
#: input before anything starts (to refuse bad input at once), and the flow it then runs
#: in the same process gets that plan instead of reading the input again.
_LAST_PLAN: list[tuple[Any, JobPlan]] = []


def plan_job(input_spec: str, columns: InputColumns, shard_size: int) -> JobPlan:
    """Plan a job: validate every input row's shape and cut the input into shards.

    The same input files (path, size and modification time), columns and shard size
    give the same plan: the last one is kept, so a second call reads nothing.

    Raises:
        InputError: Malformed input, a missing column, duplicate ids, or no rows.
    """
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, got {shard_size}", column="shard_size")
    files = discover_inputs(input_spec)
    key = (input_spec, columns.model_dump_json(), shard_size, tuple(_file_identity(f.path) for f in files))
    if _LAST_PLAN and _LAST_PLAN[0][0] == key:
        return _LAST_PLAN[0][1]
    plan = _plan_files(input_spec, files, columns, shard_size)
    _LAST_PLAN[:] = [(key, plan)]
    return plan


def _file_identity(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns


def _plan_files(input_spec: str, files: list[InputFile], columns: InputColumns, shard_size: int) -> JobPlan:
    has_id: bool | None = None
    planned: list[tuple[InputFile, list[dict[str, int]]]] = []
    id_chunks: list[Any] = []
    for f in files:
        if f.format in ("jsonl", "openai"):
            ranges, rows, file_has_id, ids = scan_jsonl(
                f.path, columns, shard_size, batch=f.format == "openai"
            )
        else:
            scanner = scan_parquet if f.format == "parquet" else scan_csv
            ranges, rows, file_has_id, ids = scanner(f.path, columns, shard_size)
        if rows:
            if has_id is not None and file_has_id != has_id:
                raise InputError(
                    "some input files have the id column and some do not", path=f.path, column=columns.id
                )
            has_id = file_has_id
        id_chunks.extend(ids)
        planned.append((f.model_copy(update={"rows": rows}), ranges))
    rows_total = sum(f.rows for f, _ in planned)
    if rows_total == 0:
        raise InputError("the input has no rows", path=input_spec)
    if has_id:
        _check_unique_ids(id_chunks, columns.id, [f for f, _ in planned])
    width = max(6, len(str(sum(len(r) for _, r in planned))))
    shards: list[ShardSpec] = []
    offset = 0
    for f, ranges in planned:
        for r in ranges:
            shards.append(
                ShardSpec(
                    shard_id=f"{len(shards):0{width}d}",
                    path=f.path,
                    format=f.format,
                    row_offset=offset + r["row_start"],
                    **r,
                )
            )
        offset += f.rows
    return JobPlan(
        files=[f for f, _ in planned], shards=shards, rows_total=rows_total, has_id_column=bool(has_id)
    )


def _check_unique_ids(chunks: list[Any], column: str, files: list[InputFile]) -> None:
    """Refuse null or repeated ids; a repeat is named by the first id that repeats, in
    input order, with where it is first and second found."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not chunks:
        return
    ids = pa.chunked_array(chunks, type=pa.string())
    if ids.null_count:
        raise InputError(f"{ids.null_count} rows have a null id", column=column)
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if not len(dup):
        return
    first = int(pc.index(pc.is_in(ids, value_set=dup.field("values")), True).as_py())
    value = ids[first].as_py()
    second = first + 1 + int(pc.index(ids.slice(first + 1), value).as_py())
    (path, at), (other_path, other_at) = _row_place(files, first), _row_place(files, second)
    where = f"on {at} and {other_at}" if other_path == path else f"on {at} and in {other_path} on {other_at}"
    more = len(dup) - 1
    others = f" ({more} more id{'s repeat' if more > 1 else ' repeats'} too)" if more else ""
    raise InputError(f"duplicate id {value!r} {where}{others}", path=path, column=column)


def _row_place(files: list[InputFile], row: int) -> tuple[str, str]:
    """The file holding the job's `row` (0-based, in input order) and where in it: `line
    N` in a text file of one row per line, `row N` (1-based) in Parquet and CSV."""
    for f in files:
        if row < f.rows:
            if f.format not in ("jsonl", "openai"):
                return f.path, f"row {row + 1}"
            with open(f.path, "rb") as fh:
                seen = 0
                for number, raw in enumerate(fh, 1):
                    if raw.strip():
                        if seen == row:
                            return f.path, f"line {number}"
                        seen += 1
        row -= f.rows
    raise AssertionError(f"row {row} is beyond the input")  # the ids were read from these files
