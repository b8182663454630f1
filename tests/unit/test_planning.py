"""Planning and shard reading: pure logic over real files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from prefect_vllm._input.planning import InputColumns, check_columns, plan_job
from prefect_vllm._input.shard_rows import read_shard, row_seeds
from prefect_vllm.exceptions import ConfigurationError, InputError

COLUMNS = InputColumns()


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"custom_id": f"id-{i}", "prompt": f"prompt {i}"} for i in range(start, start + n)]


def test_jsonl_shards_cover_every_row_once_with_stable_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", rows(10))
    plan = plan_job(str(path), COLUMNS, shard_size=4)
    assert [s.shard_id for s in plan.shards] == ["000000", "000001", "000002"]
    assert [s.num_rows for s in plan.shards] == [4, 4, 2]
    got = [r.custom_id for s in plan.shards for r in read_shard(s, COLUMNS, plan.has_id_column)]
    assert got == [f"id-{i}" for i in range(10)]
    assert plan_job(str(path), COLUMNS, shard_size=4) == plan


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n   \n{"prompt": "c"}\n')
    plan = plan_job(str(path), COLUMNS, shard_size=2)
    assert plan.rows_total == 3 and not plan.has_id_column
    assert [s.first_line for s in plan.shards] == [1, 5]
    (row,) = read_shard(plan.shards[1], COLUMNS, False)
    assert (row.custom_id, row.prompt) == ("2", "c")


def test_malformed_json_line_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "oops",}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl, line 2: malformed JSON at column \d+"):
        plan_job(str(path), COLUMNS, 10)


def test_missing_prompt_field_names_the_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(InputError, match=r"line 2, column 'prompt': missing prompt field"):
        plan_job(str(path), COLUMNS, 10)


def test_a_duplicate_id_is_named_with_both_lines_and_how_many_more_repeat(tmp_path: Path) -> None:
    data = [*rows(5), {"custom_id": "id-3", "prompt": "again"}]
    path = write_jsonl(tmp_path / "in.jsonl", data)
    with pytest.raises(InputError) as refused:
        plan_job(str(path), COLUMNS, 10)
    assert str(refused.value) == f"{path}, column 'custom_id': duplicate id 'id-3' on line 4 and line 6"
    # The first id that repeats in input order, past blank lines; then the count of the others.
    path.write_text(
        "\n"
        + path.read_text()
        + '{"custom_id": "id-1", "prompt": "x"}\n\n{"custom_id": "id-1", "prompt": "y"}\n'
    )
    with pytest.raises(
        InputError, match=r"duplicate id 'id-1' on line 3 and line 8 \(1 more id repeats too\)$"
    ):
        plan_job(str(path), COLUMNS, 10)


def test_a_duplicate_id_across_files_names_both_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", rows(3))
    pq.write_table(
        pa.table({"custom_id": ["x", "id-2"], "prompt": ["p", "q"]}), tmp_path / "in" / "b.parquet"
    )
    with pytest.raises(InputError) as refused:
        plan_job(str(tmp_path / "in"), COLUMNS, 10)
    assert str(refused.value).endswith(
        f"duplicate id 'id-2' on line 3 and in {tmp_path / 'in' / 'b.parquet'} on row 2"
    )


def test_empty_input_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no rows"):
        plan_job(str(tmp_path / "empty.jsonl"), COLUMNS, 10)


def test_missing_input_and_nonpositive_shard_size_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigurationError, match=r"input: .*nope\.jsonl is no file, folder or glob that exists"
    ):
        plan_job(str(tmp_path / "nope.jsonl"), COLUMNS, 10)
    write_jsonl(tmp_path / "in.jsonl", rows(1))
    with pytest.raises(ConfigurationError, match="shard size"):
        plan_job(str(tmp_path / "in.jsonl"), COLUMNS, 0)


def test_folder_and_glob_inputs_mix_parquet_jsonl_and_csv(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", rows(3))
    pq.write_table(pa.Table.from_pylist(rows(5, start=3)), d / "b.parquet", row_group_size=2)
    pcsv.write_csv(pa.Table.from_pylist(rows(4, start=8)), d / "c.csv")
    (d / "_ignored.jsonl").write_text("not json\n")
    for spec in (str(d), str(d / "*.*")):
        if spec.endswith("*.*"):
            (d / "_ignored.jsonl").unlink()
        plan = plan_job(spec, COLUMNS, shard_size=2)
        assert plan.rows_total == 12
        got = [r.custom_id for s in plan.shards for r in read_shard(s, COLUMNS, True)]
        assert got == [f"id-{i}" for i in range(12)]


def test_check_columns_reads_only_the_first_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    with pytest.raises(InputError, match="missing prompt column"):
        check_columns(str(path), COLUMNS)
    check_columns(str(path), InputColumns(prompt="text"))


def test_row_seeds_depend_only_on_job_seed_and_custom_id() -> None:
    assert row_seeds(7, ["a", "b"]) == row_seeds(7, ["a", "b"])
    assert row_seeds(7, ["a"]) != row_seeds(8, ["a"])
    assert row_seeds(7, ["b", "a"]) == list(reversed(row_seeds(7, ["a", "b"])))
    assert all(0 <= s < 2**63 for s in row_seeds(0, ["x", "y"]))


def test_files_that_disagree_on_the_id_column_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", rows(2))
    write_jsonl(d / "b.jsonl", [{"prompt": "no id"}])
    (d / "c.jsonl").write_text("\n")
    with pytest.raises(
        InputError, match=r"b\.jsonl, column 'custom_id': some input files have the id column"
    ):
        plan_job(str(d), COLUMNS, 10)
    (d / "b.jsonl").unlink()
    assert plan_job(str(d), COLUMNS, 10).rows_total == 2
