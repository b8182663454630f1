"""OpenAI Batch requests in and responses out, checked against the `openai` package's models."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_vllm._input.openai_batch import looks_like_batch, parse_request
from prefect_vllm._output.openai import error_line, output_line
from prefect_vllm.exceptions import InputError


def chat(custom_id: str = "c1", **body: Any) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def completion(custom_id: str = "p1", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "m", "prompt": "Once", **body},
    }


def test_chat_and_completion_requests_map_their_parameters_to_sampling_overrides() -> None:
    request = parse_request(
        chat(
            max_completion_tokens=12,
            temperature=0,
            top_p=0.5,
            stop="END",
            seed=7,
            n=2,
            logprobs=True,
            top_logprobs=3,
        ),
        path="b.jsonl",
        line=1,
    )
    assert request.error is None and request.kind == "chat"
    assert request.messages == [{"role": "user", "content": "Hi"}]
    assert request.sampling == {
        "max_tokens": 12,
        "temperature": 0.0,
        "top_p": 0.5,
        "stop": ["END"],
        "seed": 7,
        "n": 2,
        "logprobs": 3,
    }
    text = parse_request(completion(max_tokens=5, logprobs=2), path="b.jsonl", line=2)
    assert (text.kind, text.prompt, text.sampling) == ("completion", "Once", {"max_tokens": 5, "logprobs": 2})


def test_text_content_parts_are_joined_and_other_parts_are_row_errors() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert parse_request(chat(messages=parts), path="b", line=1).messages == [
        {"role": "user", "content": "ab"}
    ]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert "only text parts" in (parse_request(chat(messages=image), path="b", line=1).error or "")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"custom_id": "e", "method": "POST", "url": "/v1/moderations", "body": {"input": "x"}},
            "unsupported endpoint '/v1/moderations'",
        ),
        ({**chat("g"), "method": "GET"}, "unsupported method 'GET'"),
        (chat(tools=[{"type": "function"}]), "body.tools is not supported"),
        (chat(max_tokens=0), "body.max_tokens must be an integer >= 1"),
        (chat(temperature="hot"), "body.temperature must be a number"),
        (chat(stream=True), "cannot stream"),
        (chat(messages=[]), "body.messages must be a non-empty list"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "needs a role"),
        (completion(prompt=["a", "b"]), "lists of prompts are not supported"),
        (chat(response_format={"type": "xml"}), "response_format.type"),
        (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "json_schema.schema"),
    ],
)
def test_requests_that_cannot_be_served_are_row_errors_never_ignored(
    record: dict[str, Any], message: str
) -> None:
    request = parse_request(record, path="b.jsonl", line=3)
    assert request.error is not None and message in request.error
    assert request.custom_id == record["custom_id"]


def test_structured_output_formats_are_kept_and_text_is_the_default() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert parse_request(chat(response_format=schema), path="b", line=1).response_format == schema
    assert parse_request(chat(response_format={"type": "json_object"}), path="b", line=1).response_format == {
        "type": "json_object"
    }
    assert parse_request(chat(response_format={"type": "text"}), path="b", line=1).response_format is None


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"method": "POST", "url": "/v1/completions", "body": {}}, "custom_id"),
        ({**chat(), "custom_id": 5}, "custom_id"),
    ],
)
def test_a_line_without_a_string_custom_id_makes_the_file_unusable(
    record: dict[str, Any], field: str
) -> None:
    with pytest.raises(InputError, match=rf"batch.jsonl, line 9, column '{field}'"):
        parse_request(record, path="batch.jsonl", line=9)


def test_batch_lines_are_told_apart_from_plain_prompt_rows() -> None:
    assert looks_like_batch(chat()) and not looks_like_batch({"custom_id": "x", "prompt": "y"})


def test_output_lines_parse_with_the_openai_response_models() -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    row = {
        "custom_id": "c1",
        "text": "Hello",
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 2,
    }
    line = output_line({**row, "kind": "chat"}, model="tiny", job_id="j", created=1)
    assert line["custom_id"] == "c1" and line["response"]["status_code"] == 200 and line["error"] is None
    parsed = ChatCompletion.model_validate(line["response"]["body"])
    assert (
        parsed.choices[0].message.content == "Hello"
        and parsed.usage is not None
        and parsed.usage.total_tokens == 5
    )
    many = {
        **row,
        "choices": [{"text": "a", "finish_reason": "stop"}, {"text": "b", "finish_reason": "abort"}],
    }
    text = Completion.model_validate(
        output_line({**many, "kind": "completion"}, model="tiny", job_id="j", created=1)["response"]["body"]
    )
    assert [c.text for c in text.choices] == ["a", "b"] and [c.finish_reason for c in text.choices] == [
        "stop",
        "stop",
    ]


def test_ids_are_stable_across_exports_so_a_resumed_job_writes_the_same_lines() -> None:
    row = {
        "custom_id": "c1",
        "text": "x",
        "finish_reason": "stop",
        "prompt_tokens": 1,
        "completion_tokens": 1,
    }
    first = output_line({**row, "kind": "chat"}, model="m", job_id="job", created=1)
    assert first == output_line({**row, "kind": "chat"}, model="m", job_id="job", created=1)
    err = error_line("c2", "unsupported endpoint", job_id="job")
    assert err["response"] is None and err["error"] == {
        "code": "invalid_request",
        "message": "unsupported endpoint",
    }
    assert err["id"] != first["id"]
