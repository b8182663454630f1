"""Embedding jobs end to end: real Prefect, Ray and vLLM's pooling runner, against raw vLLM."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prefect_vllm._input.columns import CLASSIFY_OUTPUT_COLUMNS, EMBED_OUTPUT_COLUMNS, SCORE_OUTPUT_COLUMNS
from prefect_vllm.testing import write_sample_prompts
from tests.helpers import REPO, input_ids, no_engine_left, read_output, run_cli, summary_of

pytestmark = pytest.mark.integration

#: Raw vLLM on the same model and prompts: `LLM.embed` with the pooling runner.
_RAW = """
import json, os, sys
if __name__ == "__main__":
    from vllm import LLM
    from prefect_vllm.config import EngineConfig
    model, prompts, out = sys.argv[1:4]
    rows = [json.loads(line) for line in open(prompts)]
    rows = [r for r in rows if "prompt" in r]
    llm = LLM(**EngineConfig().engine_kwargs(model, on_cpu=True), runner="pooling", convert="embed")
    embedded = llm.embed([r["prompt"] for r in rows], use_tqdm=False)
    with open(out, "w") as f:
        json.dump({r["custom_id"]: [e.outputs.embedding, len(e.prompt_token_ids)] for r, e in zip(rows, embedded)}, f)
    # The engine stopped, no interpreter teardown: it can abort in a C++ thread ("terminate called").
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)
"""


def _raw_vllm(script: str, model: Path, prompts: Path, tmp_path: Path) -> dict[str, Any]:
    """Run a raw-vLLM reference `script` on `model` and `prompts` in its own process; its JSON."""
    (tmp_path / "raw.py").write_text(script)
    raw = subprocess.run(
        [sys.executable, str(tmp_path / "raw.py"), str(model), str(prompts), str(tmp_path / "raw.json")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert raw.returncode == 0, raw.stderr[-3000:]
    result: dict[str, Any] = json.loads((tmp_path / "raw.json").read_text())
    return result


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_an_embedding_job_gives_raw_vllms_vectors_and_resumes_without_an_engine(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=40, seed=5)
    with prompts.open("a") as f:  # a chat row: an embedding job embeds text, so it is a row error
        f.write(json.dumps({"custom_id": "chat-1", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--task", "embed",
            "--shard-size", "16", "--actors", "1", "--json"]  # fmt: skip
    done = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(done)
    assert (summary["rows_total"], summary["rows_ok"], summary["rows_failed"]) == (41, 40, 1)
    assert "Traceback" not in done.stderr

    table = read_output(out)
    assert tuple(table.column_names) == EMBED_OUTPUT_COLUMNS
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    rows = {r["custom_id"]: r for r in table.to_pylist()}
    assert rows["chat-1"]["embedding"] is None and "not chat messages" in rows["chat-1"]["error"]

    expected = _raw_vllm(_RAW, tiny_model, prompts, tmp_path)
    assert len(expected) == 40
    for custom_id, (vector, prompt_tokens) in expected.items():
        row = rows[custom_id]
        assert row["error"] is None and row["prompt_tokens"] == prompt_tokens
        assert len(row["embedding"]) == len(vector)
        assert _cosine(row["embedding"], vector) >= 0.9999, custom_id

    _an_openai_embeddings_file_round_trips(tmp_path, tiny_model, prompts, expected, prefect_server)

    again = run_cli(args, tmp_path / "home", api_url=prefect_server)  # all committed: no engine starts
    assert again.returncode == 0, again.stderr[-3000:]
    assert (summary_of(again)["shards_skipped"], summary_of(again)["shards_run"]) == (3, 0)
    other_task = run_cli([*args[:-1], "--task", "generate", "--max-tokens", "4"], tmp_path / "home")
    assert other_task.returncode == 2 and "task" in other_task.stderr.splitlines()[-1], other_task.stderr[
        -2000:
    ]
    no_engine_left()


def _an_openai_embeddings_file_round_trips(
    tmp_path: Path, model: Path, prompts: Path, expected: dict[str, Any], api_url: str
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
        ["run", str(batch), "--output", str(out), "--model", str(model), "--export", "openai", "--json"],
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


#: Raw vLLM's class probabilities for the same texts: `LLM.classify` with the pooling runner.
_RAW_CLASSIFY = """
import json, os, sys
if __name__ == "__main__":
    from vllm import LLM
    from prefect_vllm.config import EngineConfig
    model, prompts, out = sys.argv[1:4]
    rows = [json.loads(line) for line in open(prompts)]
    llm = LLM(**EngineConfig().engine_kwargs(model, on_cpu=True), runner="pooling")
    fits = [r for r in rows if r["custom_id"] != "too-long"]  # vLLM refuses the whole call else
    classified = llm.classify([r["prompt"] for r in fits], use_tqdm=False)
    cut = llm.classify([r["prompt"] for r in rows], use_tqdm=False, tokenization_kwargs={"truncate_prompt_tokens": 6})
    with open(out, "w") as f:
        json.dump({
            "plain": {r["custom_id"]: c.outputs.probs for r, c in zip(fits, classified)},
            "cut": {r["custom_id"]: [c.outputs.probs, len(c.prompt_token_ids)] for r, c in zip(rows, cut)},
        }, f)
    llm.llm_engine.engine_core.shutdown()  # as in _RAW
    os._exit(0)
"""


def test_a_classification_job_gives_raw_vllms_probabilities_and_the_models_class_names(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    classes = ["negative", "neutral", "positive"]
    made = run_cli(
        ["make-tiny-model", str(tmp_path / "classifier"), "--classes", ",".join(classes)], tmp_path / "home"
    )
    assert made.returncode == 0, made.stderr[-2000:]
    model = tmp_path / "classifier"
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=24, seed=9)
    with prompts.open("a") as f:  # longer than the model's context: a row error unless cut
        f.write(json.dumps({"custom_id": "too-long", "prompt": "cat dog bird " * 1000}) + "\n")
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(model), "--task", "classify",
            "--shard-size", "10", "--json"]  # fmt: skip
    done = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (summary_of(done)["rows_ok"], summary_of(done)["rows_failed"]) == (24, 1)
    table = read_output(out)
    assert tuple(table.column_names) == CLASSIFY_OUTPUT_COLUMNS
    rows = {r["custom_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(input_ids(prompts))
    assert "maximum context length is 1024 tokens" in rows["too-long"]["error"]

    raw = _raw_vllm(_RAW_CLASSIFY, model, prompts, tmp_path)
    expected = raw["plain"]
    assert len(expected) == 24
    for custom_id, probs in expected.items():
        row = rows[custom_id]
        assert row["error"] is None and len(row["probs"]) == 3
        assert max(abs(a - b) for a, b in zip(row["probs"], probs, strict=True)) <= 1e-4, custom_id
        assert row["label"] == classes[max(range(3), key=probs.__getitem__)]

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

    # A language model is no classifier: refused once its engine says so, nothing written.
    not_a_classifier = run_cli(
        [*args[:3], str(tmp_path / "out-lm"), "--model", str(tiny_model), *args[6:]], tmp_path / "home",
        api_url=prefect_server,
    )  # fmt: skip
    last = not_a_classifier.stderr.strip().splitlines()[-1]
    assert not_a_classifier.returncode == 2 and "cannot classify" in last, not_a_classifier.stderr[-3000:]
    assert "Traceback" not in not_a_classifier.stderr and not list((tmp_path / "out-lm").glob("part-*"))
    no_engine_left()


#: Raw vLLM's scores for the same text pairs: `LLM.score` with the pooling runner.
_RAW_SCORE = """
import json, os, sys
if __name__ == "__main__":
    from vllm import LLM
    from prefect_vllm.config import EngineConfig
    model, pairs, out = sys.argv[1:4]
    rows = [r for r in map(json.loads, open(pairs)) if r["document"] and r["custom_id"] != "too-long"]
    llm = LLM(**EngineConfig().engine_kwargs(model, on_cpu=True), runner="pooling")
    scored = llm.score([r["query"] for r in rows], [r["document"] for r in rows], use_tqdm=False)
    with open(out, "w") as f:
        json.dump({r["custom_id"]: [s.outputs.score, len(s.prompt_token_ids)] for r, s in zip(rows, scored)}, f)
    llm.llm_engine.engine_core.shutdown()  # as in _RAW
    os._exit(0)
"""


def test_a_scoring_job_gives_raw_vllms_scores_from_a_cross_encoder_and_from_an_embedding_model(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    made = run_cli(
        ["make-tiny-model", str(tmp_path / "reranker"), "--classes", "relevance"], tmp_path / "home"
    )
    assert made.returncode == 0, made.stderr[-2000:]
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {
            "custom_id": f"q{i}",
            "query": f"how many legs has animal {i}?",
            "document": f"animal {i} has {i % 5} legs",
        }
        for i in range(24)
    ]
    rows.append({"custom_id": "no-document", "query": "anything?", "document": None})
    rows.append({"custom_id": "too-long", "query": "anything?", "document": "cat dog bird " * 1000})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A cross-encoder (a classifier of one label) scores each pair in one pass; an embedding
    # model (the tiny Llama, converted by vLLM) by the cosine similarity of two vectors.
    for model, name in ((tmp_path / "reranker", "cross-encoder"), (tiny_model, "embedding model")):
        out = tmp_path / f"out-{model.name}"
        args = ["run", str(pairs), "--output", str(out), "--model", str(model), "--task", "score",
                "--text-column", "query", "--text-pair-column", "document", "--shard-size", "10", "--json"]  # fmt: skip
        done = run_cli(args, tmp_path / "home", api_url=prefect_server)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (summary_of(done)["rows_ok"], summary_of(done)["rows_failed"]) == (24, 2), name
        table = read_output(out)
        assert tuple(table.column_names) == SCORE_OUTPUT_COLUMNS
        scored = {r["custom_id"]: r for r in table.to_pylist()}
        assert sorted(scored) == sorted(r["custom_id"] for r in rows)
        assert scored["no-document"]["score"] is None
        assert scored["no-document"]["error"] == "document: the pair's second text must be a string, got null"
        assert "maximum context length" in scored["too-long"]["error"], scored["too-long"]["error"]

        expected = _raw_vllm(_RAW_SCORE, model, pairs, tmp_path)
        assert len(expected) == 24
        for custom_id, (score, prompt_tokens) in expected.items():
            row = scored[custom_id]
            assert row["error"] is None and row["prompt_tokens"] == prompt_tokens, (name, custom_id)
            assert abs(row["score"] - score) <= 1e-4, (name, custom_id, row["score"], score)
        assert len({round(r["score"], 6) for r in scored.values() if r["error"] is None}) > 1, "scores differ"
    no_engine_left()
