"""Rows into requests (messages, per-row sampling, OpenAI Batch files) and the OpenAI export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from prefect_vllm._columns import CHOICES, COMPLETION_TOKENS, ERROR, FINISH_REASON, PROMPT_TOKENS, TEXT
from prefect_vllm._engine.isolation import poison_message
from prefect_vllm._input.planning import InputColumns, check_columns, plan_job
from prefect_vllm._input.requests import RowRequest, parse_sampling_params, plain_row
from prefect_vllm._input.shard_rows import read_shard
from prefect_vllm._output.export import ERRORS_FILE, OUTPUT_FILE, export_openai
from prefect_vllm._output.table import output_table
from prefect_vllm._store.checkpoint import CheckpointStore
from prefect_vllm.config import RequestConfig
from prefect_vllm.exceptions import InputError
from prefect_vllm.results import ShardResult

COLUMNS = InputColumns()


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def batch_line(custom_id: Any, url: str = "/v1/completions", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": "m", "prompt": "p", **body},
    }


def test_sampling_params_come_from_a_struct_or_json_text_and_nulls_are_unset() -> None:
    assert parse_sampling_params({"n": 2, "max_tokens": None, "stop": "END"}) == {"n": 2, "stop": ["END"]}
    assert parse_sampling_params('{"temperature": 0, "seed": 7}') == {"temperature": 0.0, "seed": 7}
    assert parse_sampling_params(None) == {} and parse_sampling_params("  ") == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"beam_width": 2}, "sampling_params.beam_width is not supported"),
        ({"n": 0}, "sampling_params.n must be an integer >= 1, got 0"),
        ({"max_tokens": True}, "sampling_params.max_tokens must be an integer"),
        ({"temperature": "hot"}, "sampling_params.temperature must be a number"),
        ({"stop": [1]}, "sampling_params.stop must be a string or a list of strings"),
        ("[1, 2]", "sampling_params must be an object, got list"),
        ("{oops", "sampling_params is not valid JSON"),
    ],
)
def test_a_bad_sampling_params_value_is_that_rows_error(value: Any, message: str) -> None:
    row = plain_row("a prompt", None, value)
    assert row.error is not None and message in row.error
    assert row.payload() == {"error": row.error}


def test_a_row_with_messages_is_a_chat_row_and_bad_messages_are_row_errors() -> None:
    chat = plain_row(None, '[{"role": "user", "content": "Hi"}]', {"n": 2})
    assert chat.kind == "chat" and chat.messages == [{"role": "user", "content": "Hi"}]
    assert chat.payload() == {"messages": chat.messages, "sampling": {"n": 2}}
    assert plain_row("text", None, None).payload() == {"prompt": "text"}
    assert "messages[0] needs a role" in (plain_row(None, [{"content": "x"}], None).error or "")
    assert "non-empty list" in (plain_row(None, [], None).error or "")
    assert plain_row(None, None, None).error == "prompt must be a string or token ids, got null"


def test_an_openai_batch_file_is_recognised_and_its_rows_carry_their_own_parameters(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "batch.jsonl",
        [
            batch_line("a", max_tokens=4),
            batch_line("b", "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], n=2),
            batch_line("c", "/v1/moderations"),
            batch_line("d", logit_bias={"1": 2}),
        ],
    )
    check_columns(str(path), COLUMNS)  # no prompt column needed
    plan = plan_job(str(path), COLUMNS, shard_size=3)
    assert plan.has_id_column and [s.format for s in plan.shards] == ["openai", "openai"]
    rows = [r for s in plan.shards for r in read_shard(s, COLUMNS, True)]
    assert [r.custom_id for r in rows] == ["a", "b", "c", "d"]
    assert rows[0].sampling == {"max_tokens": 4} and rows[1].kind == "chat" and rows[1].sampling == {"n": 2}
    assert "unsupported endpoint '/v1/moderations'" in (rows[2].error or "")
    assert rows[3].error == "body.logit_bias is not supported"


def test_an_openai_batch_line_without_custom_id_names_the_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "batch.jsonl", [batch_line("a"), batch_line(None)])
    with pytest.raises(
        InputError, match=r"batch\.jsonl, line 2, column 'custom_id': must be a non-empty string"
    ):
        plan_job(str(path), COLUMNS, 10)
    write_jsonl(path, [batch_line("a"), batch_line("a")])
    with pytest.raises(
        InputError, match=r"batch\.jsonl, column 'custom_id': duplicate id 'a' on line 1 and line 2$"
    ):
        plan_job(str(path), COLUMNS, 10)


def test_messages_columns_are_read_from_parquet_structs_and_csv_json_text(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"custom_id": "p1", "messages": messages, "sampling_params": {"n": 2, "seed": None}},
                {"custom_id": "p2", "messages": None, "sampling_params": None},
            ]
        ),
        tmp_path / "a.parquet",
    )
    pcsv.write_csv(
        pa.Table.from_pylist([{"custom_id": "c1", "messages": json.dumps(messages), "prompt": ""}]),
        tmp_path / "b.csv",
    )
    plan = plan_job(str(tmp_path), COLUMNS, shard_size=10)
    rows = {r.custom_id: r for s in plan.shards for r in read_shard(s, COLUMNS, True)}
    assert rows["p1"].messages == messages and rows["p1"].sampling == {"n": 2}
    assert rows["p2"].error == "prompt must be a string or token ids, got null"
    assert rows["c1"].kind == "chat" and rows["c1"].messages == messages


def test_input_with_neither_prompt_nor_messages_is_refused_naming_both(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": "x"}]}, {"text": "b"}]
    )
    with pytest.raises(InputError, match=r"line 2, column 'prompt': missing prompt field \(or 'messages'\)"):
        plan_job(str(path), COLUMNS, 10)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"missing prompt column \(or 'messages' column\)"):
        check_columns(str(tmp_path / "t.parquet"), COLUMNS)


def test_a_job_json_schema_must_be_a_valid_schema() -> None:
    with pytest.raises(ValidationError, match="not a valid JSON schema"):
        RequestConfig(json_schema={"type": "no-such-type"})
    assert RequestConfig().response_format() is None


def _committed_shard(
    store: CheckpointStore, shard_id: str, rows: list[RowRequest], gen: dict[str, Any]
) -> ShardResult:
    checksum, _ = store.write_part(shard_id, output_table(rows, gen))
    return ShardResult(
        shard_id=shard_id, rows=len(rows), rows_ok=0, rows_failed=0, prompt_tokens=0, output_tokens=0,
        checksum=checksum, attempt=1, actor_pid=1, generate_s=0, write_s=0, total_s=0, committed_at=time.time(),
    )  # fmt: skip


def test_the_openai_export_holds_every_row_once_in_the_openai_shapes(tmp_path: Path) -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    (tmp_path / "out").mkdir()
    store = CheckpointStore(str(tmp_path / "out"))
    logprobs = [{"token": "Hi", "logprob": -0.5, "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}]
    shard_a = _committed_shard(
        store,
        "000000",
        [RowRequest("chat-1", "chat", messages=[]), RowRequest("text-1", "completion", prompt="x")],
        {
            TEXT: ["Hi", "there"], FINISH_REASON: ["length", "stop"], PROMPT_TOKENS: [5, 2],
            COMPLETION_TOKENS: [2, 1], ERROR: [None, None],
            CHOICES: [
                [{"text": "Hi", "finish_reason": "length", "completion_tokens": 1, "logprobs": logprobs},
                 {"text": "Yo", "finish_reason": "length", "completion_tokens": 1, "logprobs": logprobs}],
                None,
            ],
        },
    )  # fmt: skip
    shard_b = _committed_shard(
        store,
        "000001",
        [RowRequest("bad", "completion", error="unsupported endpoint"), RowRequest("poison", "completion")],
        {
            TEXT: [None, None], FINISH_REASON: [None, None], PROMPT_TOKENS: [None, None],
            COMPLETION_TOKENS: [None, None], ERROR: ["unsupported endpoint", poison_message(2)], CHOICES: [None, None],
        },
    )  # fmt: skip
    counts = export_openai(store, [shard_a, shard_b], job_id="job", model="tiny")
    assert counts == {"total": 4, "completed": 2, "failed": 2}
    out = [json.loads(line) for line in (tmp_path / "out" / OUTPUT_FILE).read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "out" / ERRORS_FILE).read_text().splitlines()]
    chat = ChatCompletion.model_validate(out[0]["response"]["body"])
    assert (
        [c.message.content for c in chat.choices] == ["Hi", "Yo"]
        and chat.usage
        and chat.usage.total_tokens == 7
    )
    assert chat.choices[0].logprobs and chat.choices[0].logprobs.content
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].token == "Hi"
    assert Completion.model_validate(out[1]["response"]["body"]).choices[0].text == "there"
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("bad", "invalid_request"),
        ("poison", "server_error"),
    ]
    again = export_openai(store, [shard_a, shard_b], job_id="job", model="tiny")
    assert (
        again == counts
        and [json.loads(x) for x in (tmp_path / "out" / OUTPUT_FILE).read_text().splitlines()] == out
    )
    assert not [p for p in (tmp_path / "out" / "_openai").iterdir() if p.name.startswith(".tmp")]


def test_lora_folders_are_checked_before_any_engine_starts(tmp_path: Path) -> None:
    from prefect_vllm._input.lora import find_adapters, lora_engine_args
    from prefect_vllm.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="is not a folder"):
        find_adapters(str(tmp_path / "nope"))
    with pytest.raises(ConfigurationError, match="holds no adapter"):
        find_adapters(str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"r": 12}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text('{"r": 4}')
    found = find_adapters(str(tmp_path))
    assert found == {"a": (str(tmp_path / "a"), 12), "b": (str(tmp_path / "b"), 4)}
    assert lora_engine_args(found, {}) == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 3}
    assert lora_engine_args(found, {"max_loras": 8})["max_loras"] == 8, "the user's own settings win"
    (tmp_path / "b" / "adapter_config.json").write_text('{"r": "eight"}')
    with pytest.raises(InputError, match=r"adapter_config\.json, column 'r': needs a positive integer rank"):
        find_adapters(str(tmp_path))


def test_a_model_column_picks_an_adapter_or_is_a_row_error_and_batch_bodies_fall_back() -> None:
    adapters = {"pirate": "/adapters/pirate"}
    row = plain_row("hi", None, None, model="pirate").with_adapter(adapters, strict=True)
    assert row.payload() == {"prompt": "hi", "adapter": "pirate"}
    unknown = plain_row("hi", None, None, model="gpt-4o").with_adapter(adapters, strict=True)
    assert unknown.error == "model 'gpt-4o' is not a LoRA adapter (adapters: pirate)"
    assert plain_row("hi", None, None, model="gpt-4o").with_adapter(adapters, strict=False).adapter is None
    assert plain_row("hi", None, None, model=3).error == "model must be a string, got int"
