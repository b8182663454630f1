"""Input rows into engine requests: a prompt or chat messages, per-row sampling, structure.

Pure logic, no vLLM: planning and shard reading call it on every row, the actor
receives what it returns. Something wrong with one row (an unknown sampling key,
a malformed message) becomes that row's error, never a silent ignore and never
the whole job's failure.

Examples:
    ```python
    from prefect_vllm._input.requests import plain_row

    row = plain_row(
        prompt=None,
        messages=[{"role": "user", "content": "Hi"}],
        sampling_params='{"max_tokens": 8, "n": 2}',
    )
    assert row.kind == "chat" and row.sampling == {"max_tokens": 8, "n": 2}
    ```
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "RowRequest",
    "checked",
    "messages_of",
    "parse_response_format",
    "parse_sampling_params",
    "plain_row",
    "token_ids_of",
    "with_documents",
    "with_pair",
]

#: `embedding` is an OpenAI `/v1/embeddings` request.
Kind = Literal["chat", "completion", "embedding"]

_ROLES = {"system", "developer", "user", "assistant", "tool"}

#: Per-row sampling keys (vLLM `SamplingParams` names) and what each value must be.
_SAMPLING_KEYS: dict[str, str] = {
    "max_tokens": "int>=1",
    "min_tokens": "int>=0",
    "n": "int>=1",
    "seed": "int",
    "logprobs": "int>=0",
    "top_k": "int",
    "temperature": "number",
    "top_p": "number",
    "min_p": "number",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    "repetition_penalty": "number",
    "stop": "strings",
    "ignore_eos": "bool",
}


@dataclass(frozen=True)
class RowRequest:
    """One input row, ready for the engine or failed already.

    Attributes:
        custom_id: The row's id (filled in by the reader when it comes from a column).
        kind: `chat` (messages, rendered with the chat template), `completion`, or
            `embedding` (an OpenAI `/v1/embeddings` request).
        prompt: The prompt of a completion row: text, or token ids.
        messages: The `{role, content}` messages of a chat row.
        sampling: vLLM `SamplingParams` overrides for this row (`max_tokens`, `n`, ...).
        response_format: OpenAI-style `response_format` (`json_schema` or
            `json_object`) for structured output, or None.
        error: Why the row cannot be served, when it cannot.
        model: The model the row names (an OpenAI Batch body's `model`, a `model` column).
        adapter: The LoRA adapter that generates the row, when its model names one.
        inputs: The texts (or token ids) of an embeddings request of several inputs:
            one vector each, in one output row. None for a single input (`prompt`).
        pooling: vLLM `PoolingParams` overrides for this row (an embeddings request's
            `dimensions`).
        encoding_format: `base64` when an embeddings request asked for its vectors so
            (kept in the output for the OpenAI export), else None.
        pair: A scoring job's second text (`prompt` is the first).
        documents: A rerank job's documents (`prompt` is the query).
        top_n: How many of the best documents a rerank row keeps; None: all.
    """

    custom_id: str
    kind: Kind
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    response_format: dict[str, Any] | None = None
    error: str | None = None
    model: str | None = None
    adapter: str | None = None
    inputs: list[str | list[int]] | None = None
    pooling: dict[str, Any] = field(default_factory=dict)
    encoding_format: str | None = None
    pair: str | None = None
    documents: list[str] | None = None
    top_n: int | None = None

    def payload(self) -> dict[str, Any]:
        """The plain dict the engine actor receives for this row."""
        out: dict[str, Any] = {}
        if self.error is not None:
            out["error"] = self.error
        elif self.kind == "chat":
            out["messages"] = self.messages
        elif self.inputs is not None:
            out["inputs"] = self.inputs
        else:
            out["prompt"] = self.prompt
        if self.pair is not None and self.error is None:
            out["pair"] = self.pair
        if self.documents is not None and self.error is None:
            out["documents"] = self.documents
            if self.top_n:
                out["top_n"] = self.top_n
        if self.pooling:
            out["pooling"] = self.pooling
        if self.sampling:
            out["sampling"] = self.sampling
        if self.response_format:
            out["response_format"] = self.response_format
        if self.adapter is not None:
            out["adapter"] = self.adapter
        return out

    def with_adapter(self, adapters: Mapping[str, str], *, strict: bool) -> RowRequest:
        """This row with its LoRA adapter: the adapter its `model` names, if any.

        Args:
            adapters: Adapter names (subfolders of the job's LoRA folder) to paths.
            strict: A model that names no adapter is a row error (a `model` column
                exists for this), rather than the base model (OpenAI Batch bodies
                always name some model).
        """
        if self.error is not None or self.model is None:
            return self
        if self.model in adapters:
            return dataclasses.replace(self, adapter=self.model)
        if strict:
            known = ", ".join(sorted(adapters)) or "none"
            return dataclasses.replace(
                self, error=f"model {self.model!r} is not a LoRA adapter (adapters: {known})"
            )
        return self


def plain_row(
    prompt: Any, messages: Any, sampling_params: Any, custom_id: str = "", model: Any = None
) -> RowRequest:
    """The request for a row of a plain dataset (prompt or messages column).

    A row with non-null messages is a chat row; otherwise its prompt is sent as
    text, or as token ids when it is a list of integers. Any other prompt, or an
    empty one, becomes a row error.
    """
    row = _plain_row(prompt, messages, sampling_params, custom_id)
    if model is None:
        return row
    if not isinstance(model, str):
        return dataclasses.replace(row, error=row.error or f"model must be a string, got {_type(model)}")
    return dataclasses.replace(row, model=model)


def _plain_row(prompt: Any, messages: Any, sampling_params: Any, custom_id: str) -> RowRequest:
    try:
        sampling = parse_sampling_params(sampling_params)
    except ValueError as exc:
        return RowRequest(custom_id, "completion", error=str(exc))
    if messages is not None:
        try:
            return RowRequest(
                custom_id, "chat", messages=messages_of(messages, "messages"), sampling=sampling
            )
        except ValueError as exc:
            return RowRequest(custom_id, "chat", error=str(exc))
    if isinstance(prompt, list):
        try:
            return RowRequest(
                custom_id, "completion", prompt=token_ids_of(prompt, "prompt"), sampling=sampling
            )
        except ValueError as exc:
            return RowRequest(custom_id, "completion", error=str(exc))
    if not isinstance(prompt, str):
        return RowRequest(
            custom_id, "completion", error=f"prompt must be a string or token ids, got {_type(prompt)}"
        )
    if not prompt:
        return RowRequest(custom_id, "completion", error="prompt is empty")
    return RowRequest(custom_id, "completion", prompt=prompt, sampling=sampling)


def with_pair(row: RowRequest, pair: Any, column: str) -> RowRequest:
    """A scoring job's row: its prompt is the pair's first text, `pair` (from `column`)
    the second. Anything but two texts is the row's error."""
    if row.error is not None:
        return row
    if row.kind == "chat":
        return dataclasses.replace(row, error="a score job reads text pairs, not chat messages")
    if not isinstance(row.prompt, str):
        return dataclasses.replace(row, error="prompt: a score job reads text, not token ids")
    if not isinstance(pair, str) or not pair:
        what = "empty" if pair == "" else _type(pair)
        return dataclasses.replace(
            row, error=f"{column}: the pair's second text must be a string, got {what}"
        )
    return dataclasses.replace(row, pair=pair)


def with_documents(row: RowRequest, documents: Any, column: str, top_n: Any = None) -> RowRequest:
    """A rerank job's row: its prompt is the query, `documents` (from `column`) the texts
    to rank against it, `top_n` how many of the best to keep (0 or None: all). Anything
    else is the row's error.
    """
    if row.error is not None:
        return row
    if row.kind == "chat":
        return dataclasses.replace(row, error="a rerank job reads a query and documents, not chat messages")
    if not isinstance(row.prompt, str):
        return dataclasses.replace(row, error="query: a rerank job reads text, not token ids")
    if isinstance(documents, str):
        documents = [documents]
    if not isinstance(documents, list) or not documents:
        what = "an empty list" if documents == [] else _type(documents)
        return dataclasses.replace(row, error=f"{column}: must be a non-empty list of texts, got {what}")
    for i, document in enumerate(documents):
        if not isinstance(document, str) or not document:
            what = "empty" if document == "" else _type(document)
            return dataclasses.replace(row, error=f"{column}[{i}]: a document must be a text, got {what}")
    if top_n is not None:
        try:
            top_n = checked("top_n", top_n, "int>=0")
        except ValueError as exc:
            return dataclasses.replace(row, error=str(exc))
    return dataclasses.replace(row, documents=list(documents), top_n=top_n or None)


def token_ids_of(value: Any, where: str) -> list[int]:
    """A prompt given as token ids: a non-empty list of non-negative integers.

    Raises:
        ValueError: What `where` must be.
    """
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: token ids must be a non-empty list of integers")
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"{where}[{i}]: a token id must be an integer >= 0, got {token!r}")
    return list(value)


def messages_of(value: Any, where: str) -> list[dict[str, Any]]:
    """Validated chat messages: a non-empty list of `{role, content}` with text content.

    Raises:
        ValueError: What is wrong, naming `where` and the message's index.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc.msg}") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ValueError(f"{where}[{i}] needs a role among {sorted(_ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is served
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ValueError(f"{where}[{i}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content must be a string or text parts")
        messages.append({"role": message["role"], "content": content})
    return messages


def parse_sampling_params(value: Any) -> dict[str, Any]:
    """Per-row sampling overrides from a struct (dict) or a JSON string; null keys are unset.

    Raises:
        ValueError: Not an object, an unknown key or a value of the wrong type.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"sampling_params is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ValueError(f"sampling_params must be an object, got {_type(value)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if item is None:
            continue
        rule = _SAMPLING_KEYS.get(key)
        if rule is None:
            raise ValueError(
                f"sampling_params.{key} is not supported; supported: {', '.join(sorted(_SAMPLING_KEYS))}"
            )
        out[key] = checked(f"sampling_params.{key}", item, rule)
    return out


def checked(where: str, value: Any, rule: str) -> Any:
    """`value` checked against `rule` (`int`, `int>=N`, `number`, `bool`, `strings`).

    Raises:
        ValueError: What `where` must be, and the value it got.
    """
    if rule.startswith("int"):
        minimum = int(rule[5:]) if rule.startswith("int>=") else None
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise ValueError(f"{where} must be an integer{bound}, got {value!r}")
        return value
    if rule == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if rule == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        raise ValueError(f"{where} must be a string or a list of strings")
    return value


def parse_response_format(value: Any, where: str = "response_format") -> dict[str, Any] | None:
    """An OpenAI `response_format`: None for text, else `json_object` or `json_schema`.

    Raises:
        ValueError: An unknown type, or a `json_schema` without a schema object.
    """
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError(f"{where}.type must be text, json_object or json_schema")
    if value["type"] == "text":
        return None
    if value["type"] == "json_schema":
        schema = value.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
            raise ValueError(f"{where}.json_schema.schema must be a JSON schema object")
    return dict(value)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__
