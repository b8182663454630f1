"""Rerank jobs end to end: real Prefect, Ray and vLLM's scoring of a cross-encoder, against raw vLLM."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from prefect_vllm._job_tasks import job_task
from tests.helpers import input_ids, no_engine_left, read_output, run_cli, summary_of
from tests.pooling import RawVllm, cross_encoder_rerank_answers, records, rerank_queries

pytestmark = pytest.mark.integration

if TYPE_CHECKING:
    from tests.conftest import PoolingPools


def test_a_rerank_job_ranks_each_querys_documents_by_raw_vllms_scores_and_exports_vllms_rerank_lines(
    tmp_path: Path,
    tiny_cross_encoder: Path,
    prefect_server: str,
    pooling_pools: PoolingPools,
    raw_vllm: RawVllm,
) -> None:
    queries = rerank_queries(tmp_path / "queries.jsonl")
    given = {r["custom_id"]: r for r in records(queries)}
    out = tmp_path / "out"
    pool = pooling_pools.pool(tiny_cross_encoder)
    done = run_cli(
        ["run", str(queries), "--output", str(out), "--model", str(tiny_cross_encoder), "--task", "rerank",
         "--shard-size", "5", *pool.cli_args(), "--json"],
        tmp_path / "home", api_url=prefect_server,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (summary_of(done)["rows_ok"], summary_of(done)["rows_failed"]) == (12, 3)
    table = read_output(out)
    assert tuple(table.column_names) == job_task("rerank").output_columns
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(queries))
    ranked = {r["custom_id"]: r for r in table.to_pylist()}
    assert (
        ranked["no-documents"]["error"] == "documents: must be a non-empty list of texts, got an empty list"
    )
    assert ranked["not-a-text"]["error"] == "documents[1]: a document must be a text, got int"
    assert ranked["bad-top-n"]["error"] == "top_n must be an integer >= 0, got -1"

    expected = cross_encoder_rerank_answers(raw_vllm, tiny_cross_encoder)
    assert len(expected) == 12
    for custom_id, scores in expected.items():
        row, documents = ranked[custom_id], given[custom_id]["documents"]
        assert row["error"] is None and row["prompt_tokens"] == sum(tokens for _, tokens in scores), custom_id
        # Best first, as vLLM's /v1/rerank sorts them, cut to the row's top_n.
        best = sorted(range(len(scores)), key=lambda i: scores[i][0], reverse=True)
        keep = given[custom_id].get("top_n") or len(documents)
        assert [r["index"] for r in row["results"]] == best[:keep], custom_id
        for result in row["results"]:
            assert result["document"] == documents[result["index"]]
            assert abs(result["relevance_score"] - scores[result["index"]][0]) <= 1e-4, (custom_id, result)
    assert len({round(s, 6) for scores in expected.values() for s, _ in scores}) > 1, "scores differ"

    _an_openai_rerank_file_round_trips(
        tmp_path, tiny_cross_encoder, given, ranked, prefect_server, pool.cli_args()
    )
    no_engine_left(besides=pooling_pools.cluster.engines)


def _an_openai_rerank_file_round_trips(
    tmp_path: Path,
    model: Path,
    given: dict[str, dict[str, Any]],
    ranked: dict[str, dict[str, Any]],
    api_url: str,
    pool_args: list[str],
) -> None:
    """`/v1/rerank` requests (as vLLM's run-batch takes them: one malformed) make a rerank job
    by their url; the export's bodies are vLLM's `RerankResponse`s, with the plain job's ranks."""
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse

    asked = ["r0", "r1", "r5"]
    requests = [
        {"custom_id": cid, "method": "POST", "url": "/v1/rerank",
         "body": {"model": "m", "query": given[cid]["query"], "documents": given[cid]["documents"],
                  **({"top_n": given[cid]["top_n"]} if "top_n" in given[cid] else {})}}
        for cid in asked
    ]  # fmt: skip
    requests.append({"custom_id": "bad", "method": "POST", "url": "/v1/rerank", "body": {"documents": ["a"]}})
    batch = tmp_path / "rerank.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out-openai"
    done = run_cli(
        ["run", str(batch), "--output", str(out), "--model", str(model), "--export", "openai", *pool_args,
         "--json"],
        tmp_path / "home", api_url=api_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary_of(done)["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    lines = [json.loads(line) for line in (out / "_openai" / "output.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == asked
    for line in lines:
        body = RerankResponse.model_validate(line["response"]["body"])
        want = ranked[line["custom_id"]]
        assert [(r.index, r.document.text) for r in body.results] == [
            (r["index"], r["document"]) for r in want["results"]
        ]
        for got, plain in zip(body.results, want["results"], strict=True):
            assert abs(got.relevance_score - plain["relevance_score"]) <= 1e-6
        assert body.usage.prompt_tokens == want["prompt_tokens"]
    errors = [json.loads(line) for line in (out / "_openai" / "errors.jsonl").read_text().splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("bad", "invalid_request")]
    assert errors[0]["error"]["message"] == "body.query must be a non-empty string, got null"
