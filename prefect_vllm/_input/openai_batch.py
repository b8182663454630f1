"""OpenAI Batch files in: each request line (`{custom_id, method, url, body}`) as a row.

Response lines are written by `prefect_vllm._output.openai`. Pure logic: no vLLM,
no I/O beyond what callers pass in. A request that cannot be
served (an unsupported endpoint, an unknown body field) becomes a row error, never
a silent ignore; a line that makes the whole file unusable (no `custom_id`, not an
object) is an `InputError` naming the file, line and field.

Examples:
    ```python
    from prefect_vllm._input.openai_batch import parse_request

    request = parse_request(
        {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}},
        path="batch.jsonl", line=1,
    )
    assert request.kind == "chat" and request.sampling == {"max_tokens": 8}
    ```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from prefect_vllm._input.requests import (
    RowRequest,
    checked,
    messages_of,
    parse_response_format,
    token_ids_of,
    with_documents,
)
from prefect_vllm._job_tasks import ENDPOINT_TASKS, job_task
from prefect_vllm.exceptions import InputError

__all__ = ["EMBEDDINGS", "ENDPOINTS", "endpoint_task", "looks_like_batch", "parse_request"]

#: The generation endpoints served, by URL, and the kind of request each one carries.
ENDPOINTS: dict[str, Literal["chat", "completion"]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
}

#: The embeddings endpoint: its requests make an embedding job (`task="embed"`).
EMBEDDINGS = "/v1/embeddings"

#: Every endpoint served, for messages.
_SERVED = ", ".join(ENDPOINT_TASKS)

#: Embeddings body fields that need no mapping: the job's model serves every row.
_EMBEDDING_ACCEPTED = {"model", "user"}

#: Body fields that need no mapping: the job's model serves every row, and a batch
#: never streams.
_ACCEPTED = {"model", "messages", "prompt", "stream", "user", "metadata"}


def looks_like_batch(record: Any) -> bool:
    """Whether a parsed JSONL line is an OpenAI Batch request rather than a plain row."""
    return isinstance(record, dict) and "body" in record and "url" in record


def endpoint_task(record: Any) -> str | None:
    """The job task (`generate`, `embed`, `rerank`) a request's `url` needs; None for an
    endpoint that is not served (such a request becomes a row error, in a job of any task)."""
    url = record.get("url") if isinstance(record, dict) else None
    return ENDPOINT_TASKS.get(url) if isinstance(url, str) else None


def parse_request(record: Any, *, path: str, line: int) -> RowRequest:
    """Parse one line of an OpenAI Batch file.

    Raises:
        InputError: The line cannot be attributed to a request (no string
            `custom_id`, not a JSON object): the file is unusable as it is.
    """
    if not isinstance(record, dict):
        raise InputError(
            f"an OpenAI Batch line must be an object, not {type(record).__name__}", path=path, line=line
        )
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError("must be a non-empty string", path=path, line=line, column="custom_id")
    url = record.get("url")
    task = ENDPOINT_TASKS.get(url) if isinstance(url, str) else None
    if task is None:
        return RowRequest(
            custom_id, "completion", error=f"unsupported endpoint {url!r}; supported: {_SERVED}"
        )
    kind: Literal["chat", "completion", "embedding"] = (
        "embedding" if url == EMBEDDINGS else ENDPOINTS.get(str(url), "completion")
    )
    # Every endpoint's requests are a POST with a JSON object for a body.
    if record.get("method", "POST") != "POST":
        return RowRequest(custom_id, kind, error=f"unsupported method {record.get('method')!r}; use POST")
    body = record.get("body")
    if not isinstance(body, dict):
        return RowRequest(custom_id, kind, error="body must be a JSON object")
    reader = _BODY_READERS.get(str(url))  # the endpoint decides the body's shape
    if reader is not None:
        return reader(custom_id, body)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    try:
        sampling, response_format = _sampling(body, kind)
        if kind == "chat":
            return RowRequest(
                custom_id,
                kind,
                messages=messages_of(body.get("messages"), "body.messages"),
                sampling=sampling,
                response_format=response_format,
                model=model,
            )
        return RowRequest(
            custom_id,
            kind,
            prompt=_prompt(body.get("prompt")),
            sampling=sampling,
            response_format=response_format,
            model=model,
        )
    except ValueError as exc:
        return RowRequest(custom_id, kind, error=str(exc))


def _embedding_request(custom_id: str, body: dict[str, Any]) -> RowRequest:
    """A `/v1/embeddings` request: its inputs, `dimensions` and `encoding_format`.

    `input` is a string, a list of strings, a token array or a list of token arrays;
    a list of several inputs is one row with one vector per input.
    """
    try:
        prompt, inputs = _embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ValueError(f"body.encoding_format must be float or base64, got {encoding!r}")
        pooling = {}
        if body.get("dimensions") is not None:
            pooling["dimensions"] = checked("body.dimensions", body["dimensions"], "int>=1")
        for key in body:
            if key not in _EMBEDDING_ACCEPTED and key not in ("input", "encoding_format", "dimensions"):
                raise ValueError(f"body.{key} is not supported")
    except ValueError as exc:
        return RowRequest(custom_id, "embedding", error=str(exc))
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return RowRequest(
        custom_id,
        "embedding",
        prompt=prompt,
        inputs=inputs,
        pooling=pooling,
        encoding_format="base64" if encoding == "base64" else None,
        model=model,
    )


#: Rerank body fields read, and those that need no mapping (the job's model serves every row).
_RERANK_READ = {"query", "documents", "top_n"}
_RERANK_ACCEPTED = {"model", "user"}


def _rerank_request(custom_id: str, body: dict[str, Any]) -> RowRequest:
    """A `/v1/rerank` request, as vLLM's run-batch reads it: a `query`, its `documents`
    (a text or a list of texts) and `top_n` (0 or none: every document)."""
    model = body.get("model") if isinstance(body.get("model"), str) else None
    unknown = sorted(set(body) - _RERANK_READ - _RERANK_ACCEPTED)
    query = body.get("query")
    if unknown:
        error = f"body.{unknown[0]} is not supported"
    elif not isinstance(query, str) or not query:
        error = f"body.query must be a non-empty string, got {_type(query)}"
    else:
        row = RowRequest(custom_id, "completion", prompt=query, model=model)
        return with_documents(row, body.get("documents"), "body.documents", body.get("top_n"))
    return RowRequest(custom_id, "completion", error=error, model=model)


#: The readers of the bodies of the endpoints that are not for generation, by url.
_BODY_READERS: dict[str, Callable[[str, dict[str, Any]], RowRequest]] = {
    EMBEDDINGS: _embedding_request,
    **dict.fromkeys(job_task("rerank").endpoints, _rerank_request),
}


def _type(value: Any) -> str:
    return "empty" if value == "" else "null" if value is None else type(value).__name__


def _embedding_inputs(value: Any) -> tuple[str | list[int] | None, list[str | list[int]] | None]:
    """`body.input`: one text or token array (the prompt), or a list of several of them
    (the inputs).

    Raises:
        ValueError: Empty, or not a string, token array or list of them.
    """
    where = "body.input"
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where} is empty")
        return value, None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a string, a token array, or a non-empty list of them")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return token_ids_of(value, where), None
    inputs: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise ValueError(f"{where}[{i}] is empty")
            inputs.append(item)
        elif isinstance(item, list):
            inputs.append(token_ids_of(item, f"{where}[{i}]"))
        else:
            raise ValueError(f"{where}[{i}] must be a string or a token array, got {type(item).__name__}")
    return (inputs[0], None) if len(inputs) == 1 else (None, inputs)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(
            "body.prompt must be one string (lists of prompts are not supported in a batch line)"
        )
    return value


def _sampling(body: dict[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """vLLM `SamplingParams` overrides from an OpenAI body; ValueError on anything unserved."""
    out: dict[str, Any] = {}
    response_format = None
    for key, value in body.items():
        if key in _ACCEPTED:
            if key == "stream" and value:
                raise ValueError("body.stream: a batch request cannot stream")
            continue
        if key in ("max_tokens", "max_completion_tokens"):
            out["max_tokens"] = checked(f"body.{key}", value, "int>=1")
        elif key in ("temperature", "presence_penalty", "frequency_penalty") or key == "top_p":
            out[key] = checked(f"body.{key}", value, "number")
        elif key == "seed":
            out[key] = checked(f"body.{key}", value, "int")
        elif key == "n":
            out[key] = checked(f"body.{key}", value, "int>=1")
        elif key == "stop":
            if isinstance(value, str):
                value = [value]
            if value is not None and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                raise ValueError("body.stop must be a string or a list of strings")
            if value:
                out["stop"] = value
        elif key == "logprobs":
            if kind == "chat":
                if not isinstance(value, bool):
                    raise ValueError("body.logprobs must be true or false for chat completions")
                if value:
                    out["logprobs"] = checked("body.top_logprobs", body.get("top_logprobs", 0), "int>=0")
            elif value is not None:
                out["logprobs"] = checked(f"body.{key}", value, "int>=0")
        elif key == "top_logprobs":
            continue  # read with logprobs
        elif key == "response_format":
            response_format = parse_response_format(value, "body.response_format")
        else:
            raise ValueError(f"body.{key} is not supported")
    return out, response_format
