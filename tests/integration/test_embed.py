"""Embedding jobs end to end: real Prefect, Ray and vLLM's pooling runner, against raw vLLM."""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from prefect_vllm._job_tasks import job_task
from prefect_vllm.testing import write_sample_prompts
from tests.helpers import input_ids, no_engine_left, read_output, run_cli, summary_of
from tests.pooling import (
    CLASSES,
    RawVllm,
    classifier_answers,
    classify_prompts,
    cross_encoder_answers,
    embed_prompts,
    score_pairs,
    tiny_llama_answers,
)

pytestmark = pytest.mark.integration

if TYPE_CHECKING:
    from tests.conftest import PoolingPools
    from tests.helpers import SharedPool


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_an_embedding_job_gives_raw_vllms_vectors_and_resumes_without_an_engine(
    tmp_path: Path, tiny_model: Path, prefect_server: str, pooling_pools: PoolingPools, raw_vllm: RawVllm
) -> None:
    prompts = embed_prompts(tmp_path / "prompts.jsonl")  # its chat row: an embedding job embeds text
    out = tmp_path / "out"
    pool = pooling_pools.pool(tiny_model)
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--task", "embed",
            "--shard-size", "16", "--actors", "1", "--json"]  # fmt: skip
    done = run_cli([*args, *pool.cli_args()], tmp_path / "home", api_url=prefect_server)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(done)
    assert (summary["rows_total"], summary["rows_ok"], summary["rows_failed"]) == (41, 40, 1)
    assert "Traceback" not in done.stderr

    table = read_output(out)
    assert tuple(table.column_names) == job_task("embed").output_columns
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    rows = {r["custom_id"]: r for r in table.to_pylist()}
    assert rows["chat-1"]["embedding"] is None and "not chat messages" in rows["chat-1"]["error"]

    expected = tiny_llama_answers(raw_vllm, tiny_model)["embed"]
    assert len(expected) == 40
    for custom_id, (vector, prompt_tokens) in expected.items():
        row = rows[custom_id]
        assert row["error"] is None and row["prompt_tokens"] == prompt_tokens
        assert len(row["embedding"]) == len(vector)
        assert _cosine(row["embedding"], vector) >= 0.9999, custom_id

    _an_openai_embeddings_file_round_trips(tmp_path, tiny_model, prompts, expected, prefect_server, pool)

    # All committed: no engine starts (on its own engines, as the job ran on a pool's).
    again = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (summary_of(again)["shards_skipped"], summary_of(again)["shards_run"]) == (3, 0)
    other_task = run_cli([*args[:-1], "--task", "generate", "--max-tokens", "4"], tmp_path / "home")
    assert other_task.returncode == 2 and "task" in other_task.stderr.splitlines()[-1], other_task.stderr[
        -2000:
    ]
    no_engine_left(besides=pool.engines)


def _an_openai_embeddings_file_round_trips(
    tmp_path: Path, model: Path, prompts: Path, expected: dict[str, Any], api_url: str, pool: SharedPool
) -> None:
    """`/v1/embeddings` requests (a string, several strings, token ids, one malformed body)
    make an embedding job by their url; the export is `openai`'s `CreateEmbeddingResponse`s."""
    from openai.types import CreateEmbeddingResponse
    from transformers import AutoTokenizer

    texts = {
        r["custom_id"]: r["prompt"]
        for r in map(json.loads, prompts.read_text().splitlines())
        if "prompt" in r
    }
    ids = list(expected)
    token_ids = AutoTokenizer.from_pretrained(str(model))(texts[ids[3]])["input_ids"]

    def request(custom_id: str, **body: Any) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", **body},
        }

    requests = [
        request("one", input=texts[ids[0]]),
        request("several", input=[texts[i] for i in ids[1:3]], encoding_format="base64"),
        request("tokens", input=token_ids),
        request("bad", input=[{"text": "not an input"}]),
    ]
    batch = tmp_path / "embeddings.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out-openai"
    done = run_cli(
        ["run", str(batch), "--output", str(out), "--model", str(model), "--export", "openai", *pool.cli_args(),
         "--json"],
        tmp_path / "home", api_url=api_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary_of(done)["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert "deprecated" not in done.stderr, "every input goes through vLLM's renderer, no raw prompt"
    lines = [json.loads(line) for line in (out / "_openai" / "output.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["one", "several", "tokens"]
    wanted = {"one": [ids[0]], "several": ids[1:3], "tokens": [ids[3]]}
    for line in lines:
        body = line["response"]["body"]
        if line["custom_id"] == "several":  # base64 as asked; the `openai` client decodes it so
            raw = [
                np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in body["data"]
            ]
            body = {**body, "data": [{**d, "embedding": v} for d, v in zip(body["data"], raw, strict=True)]}
        response = CreateEmbeddingResponse.model_validate(body)
        want = wanted[line["custom_id"]]
        assert [d.index for d in response.data] == list(range(len(want)))
        for d, custom_id in zip(response.data, want, strict=True):
            assert _cosine(d.embedding, expected[custom_id][0]) >= 0.9999, (line["custom_id"], custom_id)
        assert response.usage.prompt_tokens == sum(expected[i][1] for i in want)
    errors = [json.loads(line) for line in (out / "_openai" / "errors.jsonl").read_text().splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("bad", "invalid_request")]
    assert "body.input[0] must be a string or a token array" in errors[0]["error"]["message"]


def test_embedding_options_that_cannot_apply_are_refused_before_anything_starts(
    tmp_path: Path, tiny_model: Path
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=4)
    base = [
        "run",
        str(prompts),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model),
        "--task",
        "embed",
    ]
    for extra, names in (
        (["--task", "classify", "--export", "openai"], "export"),
        (["--dimensions", "0"], "dimensions"),
        (["--task", "classify", "--dimensions", "8"], "--dimensions"),
        (["--text-pair-column", "doc"], "--text-pair-column"),
        (["--task", "score", "--export", "openai"], "export"),
        (["--task", "score"], "column 'text_pair'"),  # the input has no second texts
    ):
        refused = run_cli([*base, *extra], tmp_path / "home")
        last = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode == 2 and names in last and "Traceback" not in refused.stderr, refused.stderr

    # An OpenAI Batch file's url decides the task: another task asked for, or a file of two, is refused.
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
        for i in range(3)
    ]
    lines.append({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}})
    embeddings, mixed = tmp_path / "embeddings.jsonl", tmp_path / "mixed.jsonl"
    embeddings.write_text("".join(json.dumps(line) + "\n" for line in lines[:3]))
    mixed.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for given, extra, said in (
        (
            embeddings,
            ["--task", "generate"],
            "task: 'generate', but the input's OpenAI Batch requests are for",
        ),
        (mixed, [], f"{mixed}, line 4, column 'url': a /v1/completions request is for task 'generate'"),
    ):
        refused = run_cli(["run", str(given), *base[2:6], *extra], tmp_path / "home")
        last = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode == 2 and said in last and "Traceback" not in refused.stderr, refused.stderr


def test_a_classification_job_gives_raw_vllms_probabilities_and_the_models_class_names(
    tmp_path: Path,
    tiny_model: Path,
    tiny_classifier: Path,
    prefect_server: str,
    pooling_pools: PoolingPools,
    raw_vllm: RawVllm,
) -> None:
    model = tiny_classifier
    prompts = classify_prompts(tmp_path / "prompts.jsonl")  # its too-long row: a row error unless cut
    out = tmp_path / "out"
    pool = pooling_pools.pool(model)
    args = ["run", str(prompts), "--output", str(out), "--model", str(model), "--task", "classify",
            "--shard-size", "10", *pool.cli_args(), "--json"]  # fmt: skip
    done = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (summary_of(done)["rows_ok"], summary_of(done)["rows_failed"]) == (24, 1)
    table = read_output(out)
    assert tuple(table.column_names) == job_task("classify").output_columns
    rows = {r["custom_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(input_ids(prompts))
    assert "maximum context length is 1024 tokens" in rows["too-long"]["error"]

    raw = classifier_answers(raw_vllm, model)
    expected = raw["plain"]
    assert len(expected) == 24
    for custom_id, (probs, _tokens) in expected.items():
        row = rows[custom_id]
        assert row["error"] is None and len(row["probs"]) == 3
        assert max(abs(a - b) for a, b in zip(row["probs"], probs, strict=True)) <= 1e-4, custom_id
        assert row["label"] == CLASSES[max(range(3), key=probs.__getitem__)]

    # Cut to 6 tokens as vLLM cuts them: the too-long row is classified, every row as raw vLLM's.
    cut_out = tmp_path / "out-cut"
    cut = run_cli([*args[:3], str(cut_out), *args[4:], "--truncate-prompt-tokens", "6"], tmp_path / "home",
                  api_url=prefect_server)  # fmt: skip
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert (summary_of(cut)["rows_ok"], summary_of(cut)["rows_failed"]) == (25, 0)
    assert summary_of(cut)["job_id"] != summary_of(done)["job_id"], "a cut is another job"
    for row in read_output(cut_out).to_pylist():
        probs, prompt_tokens = raw["cut"][row["custom_id"]]
        assert row["error"] is None and row["prompt_tokens"] == prompt_tokens <= 6, row["custom_id"]
        assert prompt_tokens == 6 or row["custom_id"] != "too-long"
        assert max(abs(a - b) for a, b in zip(row["probs"], probs, strict=True)) <= 1e-4, row["custom_id"]

    # A language model is no classifier: refused once its own engine says so, nothing written.
    not_a_classifier = run_cli(
        ["run", str(prompts), "--output", str(tmp_path / "out-lm"), "--model", str(tiny_model), "--task",
         "classify", "--shard-size", "10", "--json"],
        tmp_path / "home", api_url=prefect_server,
    )  # fmt: skip
    last = not_a_classifier.stderr.strip().splitlines()[-1]
    assert not_a_classifier.returncode == 2 and "cannot classify" in last, not_a_classifier.stderr[-3000:]
    assert "Traceback" not in not_a_classifier.stderr and not list((tmp_path / "out-lm").glob("part-*"))
    no_engine_left(besides=pool.engines)


def test_a_scoring_job_gives_raw_vllms_scores_from_a_cross_encoder_and_from_an_embedding_model(
    tmp_path: Path,
    tiny_model: Path,
    tiny_cross_encoder: Path,
    prefect_server: str,
    pooling_pools: PoolingPools,
    raw_vllm: RawVllm,
) -> None:
    pairs = score_pairs(tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    # A cross-encoder (a classifier of one label) scores each pair in one pass; an embedding
    # model (the tiny Llama, converted by vLLM) by the cosine similarity of two vectors.
    references = {
        "cross-encoder": lambda: cross_encoder_answers(raw_vllm, tiny_cross_encoder),
        "embedding model": lambda: tiny_llama_answers(raw_vllm, tiny_model)["score"],
    }
    for model, name in ((tiny_cross_encoder, "cross-encoder"), (tiny_model, "embedding model")):
        out = tmp_path / f"out-{model.name}"
        pool = pooling_pools.pool(model)
        args = ["run", str(pairs), "--output", str(out), "--model", str(model), "--task", "score",
                "--text-column", "query", "--text-pair-column", "document", "--shard-size", "10",
                *pool.cli_args(), "--json"]  # fmt: skip
        done = run_cli(args, tmp_path / "home", api_url=prefect_server)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (summary_of(done)["rows_ok"], summary_of(done)["rows_failed"]) == (24, 2), name
        table = read_output(out)
        assert tuple(table.column_names) == job_task("score").output_columns
        scored = {r["custom_id"]: r for r in table.to_pylist()}
        assert sorted(scored) == sorted(r["custom_id"] for r in rows)
        assert scored["no-document"]["score"] is None
        assert scored["no-document"]["error"] == "document: the pair's second text must be a string, got null"
        assert "maximum context length" in scored["too-long"]["error"], scored["too-long"]["error"]

        expected = references[name]()
        assert len(expected) == 24
        for custom_id, (score, prompt_tokens) in expected.items():
            row = scored[custom_id]
            assert row["error"] is None and row["prompt_tokens"] == prompt_tokens, (name, custom_id)
            assert abs(row["score"] - score) <= 1e-4, (name, custom_id, row["score"], score)
        assert len({round(r["score"], 6) for r in scored.values() if r["error"] is None}) > 1, "scores differ"
    no_engine_left(besides=pooling_pools.cluster.engines)
