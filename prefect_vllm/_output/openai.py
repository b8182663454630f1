"""OpenAI Batch response lines (`output.jsonl`, `errors.jsonl`) for output rows.

Pure logic: each function turns one part-file row into one line. Response ids derive
from the job id and the row's `custom_id`, so the export of a resumed job writes the
same ids as the export of an uninterrupted one. Every line writer has the same
signature (`ResponseLine`): the task table (`prefect_vllm._job_tasks`) names each
task's.

Examples:
    ```python
    from prefect_vllm._output.openai import rerank_line

    row = {"custom_id": "q1", "prompt_tokens": 9, "error": None,
           "results": [{"index": 1, "relevance_score": 0.9, "document": "b"}]}
    body = rerank_line(row, model="m", job_id="j", created=0)["response"]["body"]
    assert body["results"][0] == {"index": 1, "document": {"text": "b", "multi_modal": None},
                                  "relevance_score": 0.9}
    ```
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any, Protocol

__all__ = ["ResponseLine", "embedding_line", "error_line", "output_line", "rerank_line"]


class ResponseLine(Protocol):
    """A task's writer of one `output.jsonl` line for one successful output row."""

    def __call__(self, row: dict[str, Any], *, model: str, job_id: str, created: int) -> dict[str, Any]: ...


def _request_id(custom_id: str, job_id: str) -> str:
    return hashlib.sha256(f"{job_id}:{custom_id}".encode()).hexdigest()[:24]


def output_line(row: dict[str, Any], *, model: str, job_id: str, created: int) -> dict[str, Any]:
    """A line of `output.jsonl` for a generated row, in the OpenAI Batch shape.

    Args:
        row: One output row: `custom_id`, `text`, `finish_reason`, `prompt_tokens`,
            `completion_tokens`, `kind` (`chat` makes a `chat.completion`, else a
            `text_completion`), and `choices` (a list of `{text, finish_reason,
            logprobs}`) when the request asked for `n > 1` or logprobs.
        model: The model name reported in the body.
        job_id: The job's id; ids are derived from it and `custom_id`, so a
            resumed export writes the same ids.
        created: Unix time reported in the body.
    """
    kind = row.get("kind") or "completion"
    request_id = _request_id(row["custom_id"], job_id)
    choices = row.get("choices") or [{"text": row["text"], "finish_reason": row["finish_reason"]}]
    prompt_tokens = int(row.get("prompt_tokens") or 0)
    completion_tokens = int(row.get("completion_tokens") or 0)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if kind == "chat":
        body: dict[str, Any] = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c["text"]},
                    "finish_reason": _finish_reason(c["finish_reason"]),
                    "logprobs": _chat_logprobs(c.get("logprobs")),
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage,
        }
    else:
        body = {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "text": c["text"],
                    "finish_reason": _finish_reason(c["finish_reason"]),
                    "logprobs": _completion_logprobs(c.get("logprobs")),
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage,
        }
    return _response_line(row["custom_id"], request_id, body)


def embedding_line(row: dict[str, Any], *, model: str, job_id: str, created: int = 0) -> dict[str, Any]:
    """A line of `output.jsonl` for an embedded row, in the OpenAI Batch shape: its body is
    a `CreateEmbeddingResponse` (`object: "list"`, one `data` item per input, `usage`).

    Args:
        row: One output row of an embedding job: `custom_id`, `embedding`, `embeddings`
            (every input's vector, for a request of several inputs), `prompt_tokens`
            and `encoding_format` (`base64` for little-endian float32 bytes, as OpenAI
            writes them; floats otherwise).
        model: The model name reported in the body.
        job_id: The job's id; ids are derived from it and `custom_id`.
        created: Unused: an embeddings response has no creation time.
    """
    request_id = _request_id(row["custom_id"], job_id)
    vectors = row.get("embeddings") or [row["embedding"]]
    as_base64 = row.get("encoding_format") == "base64"
    prompt_tokens = int(row.get("prompt_tokens") or 0)
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _base64(v) if as_base64 else v}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return _response_line(row["custom_id"], request_id, body)


def rerank_line(row: dict[str, Any], *, model: str, job_id: str, created: int = 0) -> dict[str, Any]:
    """A line of `output.jsonl` for a reranked row: its body is vLLM's `/v1/rerank`
    response (`RerankResponse`: `id`, `model`, `usage`, `results` best first, each
    with the document's `index`, its `document` and its `relevance_score`).

    Args:
        row: One output row of a rerank job: `custom_id`, `results`, `prompt_tokens`.
        model: The model name reported in the body.
        job_id: The job's id; ids are derived from it and `custom_id`.
        created: Unused: a rerank response has no creation time.
    """
    request_id = _request_id(row["custom_id"], job_id)
    prompt_tokens = int(row.get("prompt_tokens") or 0)
    body = {
        "id": f"rerank-{request_id}",
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "results": [
            {
                "index": r["index"],
                "document": {"text": r["document"], "multi_modal": None},
                "relevance_score": r["relevance_score"],
            }
            for r in row["results"] or ()
        ],
    }
    return _response_line(row["custom_id"], request_id, body)


def _response_line(custom_id: str, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A line of `output.jsonl`: a successful response's envelope around its `body`."""
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def _base64(vector: list[float]) -> str:
    """A vector as OpenAI's `encoding_format: base64` writes it: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _chat_logprobs(tokens: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Chat completions' logprobs: `{content: [{token, logprob, bytes, top_logprobs}]}`."""
    if tokens is None:
        return None

    def entry(token: str | None, logprob: float | None) -> dict[str, Any]:
        return {"token": token or "", "logprob": logprob, "bytes": list((token or "").encode())}

    return {
        "content": [
            {
                **entry(t["token"], t["logprob"]),
                "top_logprobs": [entry(top["token"], top["logprob"]) for top in t["top_logprobs"] or ()],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def _completion_logprobs(tokens: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Legacy completions' logprobs: parallel lists of tokens, logprobs and top candidates."""
    if tokens is None:
        return None
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t["token"] or "")
    return {
        "tokens": [t["token"] or "" for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [{top["token"]: top["logprob"] for top in t["top_logprobs"] or ()} for t in tokens],
        "text_offset": offsets,
    }


def error_line(custom_id: str, message: str, *, job_id: str, code: str = "invalid_request") -> dict[str, Any]:
    """A line of `errors.jsonl` for a row that has an error instead of a completion."""
    return {
        "id": f"batch_req_{_request_id(custom_id, job_id)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _finish_reason(reason: Any) -> str:
    """vLLM's finish reasons mapped onto OpenAI's (`abort` has no equivalent)."""
    return reason if reason in ("stop", "length", "tool_calls", "content_filter") else "stop"
