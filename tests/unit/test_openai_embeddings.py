"""OpenAI `/v1/embeddings` requests in and responses out, checked against the `openai` package."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from openai.types import CreateEmbeddingResponse

from prefect_vllm._input.openai_batch import endpoint_task, parse_request
from prefect_vllm._input.planning import InputColumns, discover_inputs, input_task, plan_job
from prefect_vllm._input.requests import RowRequest, plain_row
from prefect_vllm._job_tasks import job_task
from prefect_vllm._output.openai import embedding_line
from prefect_vllm._output.table import output_table
from prefect_vllm.exceptions import ConfigurationError, InputError
from prefect_vllm.flows._resolve import resolve_task


def embedding(custom_id: str = "e1", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", **body}}


def _parse(record: dict[str, Any]) -> RowRequest:
    return parse_request(record, path="b.jsonl", line=1)


def test_every_input_form_openai_accepts_becomes_one_row() -> None:
    text = _parse(embedding(input="a cat"))
    assert (text.kind, text.prompt, text.inputs, text.error) == ("embedding", "a cat", None, None)
    assert text.payload() == {"prompt": "a cat"}
    tokens = _parse(embedding(input=[5, 6, 7]))
    assert (tokens.prompt, tokens.inputs) == ([5, 6, 7], None)
    several = _parse(embedding(input=["a", [1, 2], "b"], dimensions=8, encoding_format="base64"))
    assert (several.prompt, several.inputs) == (None, ["a", [1, 2], "b"])
    assert several.payload() == {"inputs": ["a", [1, 2], "b"], "pooling": {"dimensions": 8}}
    assert several.encoding_format == "base64"
    assert _parse(embedding(input=["only"])).prompt == "only", "a list of one input is that input"
    assert _parse(embedding(input="x", encoding_format="float")).encoding_format is None
    assert _parse(embedding(input="x", encoding_format=None, dimensions=None)).error is None
    assert _parse(embedding(input="x", user="u")).error is None


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "body.input must be a string, a token array, or a non-empty list of them"),
        ({"input": ""}, "body.input is empty"),
        ({"input": []}, "body.input must be a string"),
        ({"input": ["a", ""]}, "body.input[1] is empty"),
        ({"input": ["a", {"x": 1}]}, "body.input[1] must be a string or a token array, got dict"),
        ({"input": [1, -2]}, "body.input[1]: a token id must be an integer >= 0, got -2"),
        ({"input": ["a", []]}, "body.input[1]: token ids must be a non-empty list of integers"),
        (
            {"input": "a", "encoding_format": "int8"},
            "body.encoding_format must be float or base64, got 'int8'",
        ),
        ({"input": "a", "dimensions": 0}, "body.dimensions must be an integer >= 1, got 0"),
        ({"input": "a", "temperature": 1}, "body.temperature is not supported"),
    ],
)
def test_a_malformed_embeddings_body_is_that_rows_error(body: dict[str, Any], error: str) -> None:
    record = {"custom_id": "bad", "method": "POST", "url": "/v1/embeddings", "body": body}
    request = _parse(record)
    assert request.error is not None and request.error.startswith(error), request.error
    assert request.payload() == {"error": request.error}


def test_the_endpoint_decides_the_task_and_a_file_mixing_tasks_is_refused_at_its_line(tmp_path: Path) -> None:
    assert endpoint_task(embedding(input="a")) == "embed"
    assert endpoint_task({"url": "/v1/completions"}) == "generate"
    assert endpoint_task({"url": "/v1/moderations"}) is None
    lines = [
        {"custom_id": "m", "method": "POST", "url": "/v1/moderations", "body": {}},
        embedding("a", input="a"),
        embedding("b", input="b"),
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
    ]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert input_task(discover_inputs(str(mixed))) == "embed", "judged by the first served endpoint"
    with pytest.raises(InputError) as refused:
        plan_job(str(mixed), InputColumns(), 10)
    assert str(refused.value) == (
        f"{mixed}, line 4, column 'url': a /v1/completions request is for task 'generate', but line 2's "
        "(/v1/embeddings) is for 'embed': one file is one job, of one task"
    )
    embeds = tmp_path / "in" / "a.jsonl"
    embeds.parent.mkdir()
    embeds.write_text("".join(json.dumps(line) + "\n" for line in lines[:3]))
    plan = plan_job(str(embeds), InputColumns(), 10)
    assert plan.rows_total == 3 and plan.has_id_column
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps(lines[3]) + "\n")
    with pytest.raises(
        InputError, match=r"b\.jsonl, column 'url': its requests are for task 'generate', but"
    ):
        input_task(discover_inputs(str(tmp_path / "in")))


def test_the_task_asked_for_must_be_the_one_the_requests_need() -> None:
    assert resolve_task(None, "embed") == "embed"
    assert resolve_task(None, None) == "generate"
    assert resolve_task("classify", None) == "classify"
    assert resolve_task("embed", "embed") == "embed"
    with pytest.raises(ConfigurationError, match=r"^task: 'generate', but the input's OpenAI Batch requests"):
        resolve_task("generate", "embed")


def test_plain_rows_may_give_token_ids_for_their_prompt() -> None:
    assert plain_row([1, 2, 3], None, None).prompt == [1, 2, 3]
    assert plain_row([1, "a"], None, None).error == "prompt[1]: a token id must be an integer >= 0, got 'a'"
    assert plain_row([], None, None).error == "prompt: token ids must be a non-empty list of integers"


def _floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_embedded_rows_export_as_create_embedding_responses() -> None:
    requests = [
        _parse(embedding("one", input="a")),
        _parse(embedding("many", input=["a", "b"], encoding_format="base64")),
    ]
    table = output_table(
        requests,
        {
            "embedding": [[0.5, -0.25], [0.5, -0.25]],
            "prompt_tokens": [3, 7],
            "error": [None, None],
            "embeddings": [None, [[0.5, -0.25], [1.0, 0.125]]],
        },
        "embed",
    )
    assert table.schema == job_task("embed").schema()
    one, many = (embedding_line(row, model="tiny", job_id="j") for row in table.to_pylist())
    assert (one["custom_id"], one["error"], one["response"]["status_code"]) == ("one", None, 200)
    body = CreateEmbeddingResponse.model_validate(one["response"]["body"])
    assert [d.embedding for d in body.data] == [[0.5, -0.25]]
    assert (body.object, body.model, body.usage.prompt_tokens, body.usage.total_tokens) == (
        "list",
        "tiny",
        3,
        3,
    )
    several = many["response"]["body"]
    assert all(isinstance(d["embedding"], str) for d in several["data"]), "base64, as asked"
    # The `openai` client decodes base64 vectors into floats before its model holds them.
    decoded = {**several, "data": [{**d, "embedding": _floats(d["embedding"])} for d in several["data"]]}
    body = CreateEmbeddingResponse.model_validate(decoded)
    assert [(d.index, d.embedding) for d in body.data] == [(0, [0.5, -0.25]), (1, [1.0, 0.125])]
    assert body.usage.prompt_tokens == 7
    assert one["id"] == embedding_line(table.to_pylist()[0], model="tiny", job_id="j")["id"] != many["id"]
