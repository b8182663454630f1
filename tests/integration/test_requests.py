"""Batch-user request features end to end (real vLLM, Ray, Prefect): OpenAI Batch files in and
out, chat templates, structured output, per-row sampling and n > 1."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import STRUCTURED_ENGINE_ARGS, SharedPool, no_engine_left, read_output, run_cli, summary_of

pytestmark = pytest.mark.integration

#: Only enums, bounded integers and booleans: a random model fills free strings with
#: control characters that xgrammar lets through but strict JSON parsers refuse.
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "sure": {"type": "boolean"},
    },
    "required": ["answer", "score", "sure"],
    "additionalProperties": False,
}


def request(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": "tiny", **body},
    }  # body may name another


def chat(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    return request(custom_id, "/v1/chat/completions", messages=messages, **body)


def completion(custom_id: str, prompt: str, **body: Any) -> dict[str, Any]:
    return request(custom_id, "/v1/completions", prompt=prompt, **body)


def batch_file(path: Path) -> list[dict[str, Any]]:
    schema_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    requests = [
        *(chat(f"chat-{i}", f"Tell me about cat {i}.", max_tokens=6 + i) for i in range(6)),
        chat("chat-n2", "Name two birds.", n=2, max_completion_tokens=5, temperature=0.9, seed=11),
        chat("chat-logprobs", "Say hi.", logprobs=True, top_logprobs=2, max_tokens=4),
        chat("chat-stop", "Count.", stop=["\n"], max_tokens=12, top_p=0.5),
        *(
            chat(f"json-{i}", f"Is {i} prime?", response_format=schema_format, max_tokens=64)
            for i in range(5)
        ),
        chat("json-object", "Any JSON.", response_format={"type": "json_object"}, max_tokens=64),
        *(completion(f"text-{i}", f"Once upon a time {i}", max_tokens=5, temperature=0) for i in range(5)),
        completion("text-logprobs", "The river", logprobs=1, max_tokens=3),
        request("bad-endpoint", "/v1/moderations", input="moderate me"),
        completion("too-long", "cat dog bird " * 2000, max_tokens=4),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return requests


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chat_template_tokens(
    tiny_model: Path, messages: list[dict[str, Any]], template: str | None = None
) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, chat_template=template
    )
    return len(ids if isinstance(ids, list) else ids["input_ids"])


def test_openai_batch_file_exports_responses_the_openai_models_parse(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    """Chat and completion requests with their own parameters, structured output, n > 1,
    logprobs; an unsupported endpoint and an over-long prompt land in errors.jsonl alone."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    requests = batch_file(tmp_path / "batch.jsonl")
    by_id = {r["custom_id"]: r for r in requests}
    out = tmp_path / "out"
    proc = run_cli(
        ["run", str(tmp_path / "batch.jsonl"), "--output", str(out), "--model", str(tiny_model),
         "--shard-size", "8", "--max-tokens", "16", "--export", "openai", "--json",
         "--engine-args", STRUCTURED_ENGINE_ARGS, *shared_pool.cli_args()],
        tmp_path / "home",
        api_url=prefect_server,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = summary_of(proc)
    assert summary["request_counts"] == {"total": len(requests), "completed": len(requests) - 2, "failed": 2}

    outputs, errors = jsonl(out / "_openai" / "output.jsonl"), jsonl(out / "_openai" / "errors.jsonl")
    assert Counter(r["custom_id"] for r in outputs + errors) == Counter(list(by_id)), (
        "each request exactly once"
    )
    assert {e["custom_id"] for e in errors} == {"bad-endpoint", "too-long"}
    for e in errors:
        assert e["response"] is None and e["error"]["code"] == "invalid_request" and e["error"]["message"]
    assert (
        "unsupported endpoint '/v1/moderations'"
        in next(e for e in errors if e["custom_id"] == "bad-endpoint")["error"]["message"]
    )

    bodies: dict[str, Any] = {}
    for line in outputs:
        assert line["error"] is None and line["response"]["status_code"] == 200
        url = by_id[line["custom_id"]]["url"]
        model = ChatCompletion if url == "/v1/chat/completions" else Completion
        bodies[line["custom_id"]] = model.model_validate(line["response"]["body"])
    for i in range(6):
        body = bodies[f"chat-{i}"]
        assert body.object == "chat.completion" and body.choices[0].message.content is not None
        assert body.usage is not None and 0 < body.usage.completion_tokens <= 6 + i, "per-request max_tokens"
        rendered = chat_template_tokens(tiny_model, by_id[f"chat-{i}"]["body"]["messages"])
        assert body.usage.prompt_tokens == rendered, "chat rows are rendered with the model's chat template"
    assert len(bodies["chat-n2"].choices) == 2 and [c.index for c in bodies["chat-n2"].choices] == [0, 1]
    logprobs = bodies["chat-logprobs"].choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == bodies["chat-logprobs"].usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 2 for t in logprobs.content)
    assert "\n" not in (bodies["chat-stop"].choices[0].message.content or "")
    for i in range(5):
        body = bodies[f"json-{i}"]
        assert body.choices[0].finish_reason == "stop", body.choices[0]
        jsonschema.validate(json.loads(body.choices[0].message.content or ""), SCHEMA)
    # json_object allows any keys: a random model may run out of tokens inside one.
    json_object = bodies["json-object"].choices[0]
    assert (json_object.message.content or "").startswith("{")
    if json_object.finish_reason == "stop":
        assert isinstance(json.loads(json_object.message.content or ""), dict)
    for i in range(5):
        assert bodies[f"text-{i}"].object == "text_completion" and bodies[f"text-{i}"].choices[0].text
    text_logprobs = bodies["text-logprobs"].choices[0].logprobs
    assert text_logprobs is not None and len(text_logprobs.tokens or []) == 3
    no_engine_left(besides=shared_pool.engines)


def test_messages_and_sampling_params_columns_with_a_job_template_and_schema(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    """A Parquet dataset with chat messages and per-row sampling structs; the job's own chat
    template and JSON schema; a row with an unknown sampling key is a row error."""
    from prefect_vllm.config import EngineConfig, RequestConfig, SamplingConfig
    from prefect_vllm.flows import batch_inference

    template = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' + greeting }}{% endif %}"
    )
    rows = [
        {
            "custom_id": f"row-{i}",
            "prompt": None,
            "messages": [{"role": "user", "content": f"Is {i} even?"}],
            "sampling_params": {"n": 3 if i == 1 else None, "max_tokens": None, "bad_key": None},
        }
        for i in range(6)
    ]
    rows.append({"custom_id": "plain", "prompt": "The sea", "messages": None, "sampling_params": None})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "chats.parquet")
    bad = {"custom_id": "bad", "prompt": "x", "sampling_params": json.dumps({"beam_width": 4})}
    (tmp_path / "more.jsonl").write_text(json.dumps(bad) + "\n")

    result = batch_inference(
        input=str(tmp_path / "*.*"),
        output=str(tmp_path / "out"),
        model=str(tiny_model),
        shard_size=4,
        sampling=SamplingConfig(max_tokens=64, temperature=1.0, seed=5),
        requests=RequestConfig(
            chat_template=template, chat_template_kwargs={"greeting": "Sure:"}, json_schema=SCHEMA
        ),
        engine=EngineConfig(engine_args=json.loads(STRUCTURED_ENGINE_ARGS)),
        **shared_pool.kwargs(),
    )
    assert (result.rows_ok, result.rows_failed) == (7, 1)
    out = {r["custom_id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert "sampling_params.beam_width is not supported" in out["bad"]["error"]
    expected = chat_template_tokens(
        tiny_model, [{"role": "user", "content": "Is 0 even?"}], template.replace("greeting", "'Sure:'")
    )
    assert out["row-0"]["kind"] == "chat" and out["row-0"]["prompt_tokens"] == expected
    assert out["plain"]["kind"] == "completion"
    assert len(out["row-1"]["choices"]) == 3 and out["row-0"]["choices"] is None
    generated = [c["text"] for c in out["row-1"]["choices"]] + [
        r["text"] for r in out.values() if r["error"] is None
    ]
    for text in generated:
        jsonschema.validate(json.loads(text), SCHEMA)
    no_engine_left(besides=shared_pool.engines)


def test_rows_naming_a_lora_adapter_are_generated_with_it(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    """A `model` column or an OpenAI body's model picks an adapter from the job's LoRA folder;
    an unknown name in a `model` column is a row error, in an OpenAI body the base model."""
    from prefect_vllm.config import RequestConfig, SamplingConfig
    from prefect_vllm.flows import batch_inference
    from prefect_vllm.testing import make_tiny_lora

    make_tiny_lora(tmp_path / "adapters" / "pirate", tiny_model)
    make_tiny_lora(tmp_path / "adapters" / "sailor", tiny_model, seed=1)
    prompt = "Tell me about the sea."
    plain = [
        {"custom_id": "base", "prompt": prompt, "model": None},
        {"custom_id": "pirate", "prompt": prompt, "model": "pirate"},
        {"custom_id": "unknown", "prompt": prompt, "model": "parrot"},
        {"custom_id": "sailor", "prompt": prompt, "model": "sailor"},
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    batch = [
        completion("batch-pirate", prompt, model="pirate"),
        completion("batch-base", prompt, model="gpt-4o-mini"),
    ]
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in batch))

    def run(output: str, requests: RequestConfig, **pool: str) -> dict[str, Any]:
        batch_inference(
            input=str(tmp_path / "in"),
            output=str(tmp_path / output),
            model=str(tiny_model),
            sampling=SamplingConfig(max_tokens=12, temperature=0.0),
            requests=requests,
            **pool,
        )
        return {r["custom_id"]: r for r in read_output(tmp_path / output).to_pylist()}

    out = run("out", RequestConfig(lora_dir=str(tmp_path / "adapters")))
    without = run("out-no-lora", RequestConfig(), **shared_pool.kwargs())  # no adapters: any engine
    assert sum(1 for r in out.values() if r["error"]) == 1
    assert "model 'parrot' is not a LoRA adapter (adapters: pirate, sailor)" in out["unknown"]["error"]
    # Greedy on a random model: near-ties may flip a late token between batches, so
    # compare how the completions start.
    start = {k: out[k]["text"][:4] for k in ("base", "pirate", "sailor", "batch-base", "batch-pirate")}
    assert start["pirate"] == start["batch-pirate"], start
    assert start["base"] == start["batch-base"] == without["base"]["text"][:4], "base rows must stay base"
    assert len({start["base"], start["pirate"], start["sailor"]}) == 3, f"an adapter changed nothing: {start}"
    assert without["pirate"]["text"][:4] == start["base"], "without a LoRA folder, model is not read"
    no_engine_left(besides=shared_pool.engines)
