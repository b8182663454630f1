"""The table of job tasks: every task has all it needs, and rerank rows are read and written as vLLM's."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, get_args

import pytest

from prefect_vllm._input.openai_batch import endpoint_task, parse_request
from prefect_vllm._input.planning import InputColumns, JobPlan, plan_job
from prefect_vllm._input.requests import RowRequest, plain_row, with_documents
from prefect_vllm._input.shard_rows import read_shard
from prefect_vllm._job import job_fingerprint
from prefect_vllm._job_tasks import JOB_TASKS, OPTIONS, TaskName, job_task
from prefect_vllm._output.openai import rerank_line
from prefect_vllm._output.table import output_table
from prefect_vllm.config import EngineConfig, RequestConfig, SamplingConfig
from prefect_vllm.exceptions import ConfigurationError
from prefect_vllm.flows._resolve import check_task

PACKAGE = Path(__file__).resolve().parents[2] / "prefect_vllm"


def test_every_task_has_a_row_builder_a_schema_a_fingerprint_rule_and_a_refusal_for_each_option_it_lacks() -> (
    None
):
    assert tuple(JOB_TASKS) == get_args(TaskName), "the flow's task parameter lists the table's tasks"
    for name, task in JOB_TASKS.items():
        assert task.name == name
        # A row builder: a text row becomes the task's request (a second column's value too).
        row = read_row(task.name, task.text_column, task.pair_column)
        assert row.error is None, (name, row.error)
        # The schema's columns are the output columns, and the engine's columns are among them.
        schema = task.schema()
        assert tuple(schema.names) == task.output_columns, name
        assert set(task.row_columns) | set(task.row_extras) | {"custom_id"} == set(task.output_columns), name
        failed = task.failed_row("bad")
        table = output_table([row], {k: [v] for k, v in failed.items()}, name)
        assert table.schema == schema and table.to_pylist()[0]["error"] == "bad"
        # A fingerprint rule: the task is in it (a generation job's id is what it always was).
        fingerprint = job_fingerprint(
            "m", [], InputColumns(), 8, SamplingConfig(), EngineConfig(), RequestConfig(), task=name
        )
        assert fingerprint.get("task") == (name if task.pools else None), name
        assert any(k.startswith("sampling.") for k in fingerprint) == task.samples, name
        # Each option either applies or is refused in one line naming the parameter and the job.
        for option in OPTIONS:
            refusal = task.refusal(option, "--flag")
            assert (refusal is None) == (option in task.options), (name, option)
            if refusal is not None:
                assert refusal.startswith("--flag: ") and "\n" not in refusal, refusal
        # Its engines' task, and an OpenAI export only where a response line exists.
        assert task.serves in ("generate", "embed", "classify", "score")
        assert ("export" in task.options) == (task.response_line is not None), name
        for url in task.endpoints:
            assert endpoint_task({"url": url}) == name


def read_row(task: str, text_column: str, pair_column: str | None) -> RowRequest:
    """One row of a plain JSONL file, read by the shard reader as a `task` job reads it."""
    import tempfile

    record: dict[str, Any] = {"custom_id": "r1", text_column: "a text"}
    if pair_column is not None:
        record[pair_column] = ["one", "two"] if task == "rerank" else "another text"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_text(json.dumps(record) + "\n")
        columns = InputColumns.of_task(job_task(task))
        plan: JobPlan = plan_job(str(path), columns, 8)
        (row,) = read_shard(plan.shards[0], columns, plan.has_id_column, None, task)
    return row


def test_nothing_outside_the_table_switches_on_a_tasks_name() -> None:
    """`task == "embed"` and its kin live in the table only (STYLE.md: one table for what varies)."""
    names = set(JOB_TASKS)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_job_tasks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                sides = [node.left, *node.comparators]
                names_task = any(
                    isinstance(s, ast.Name | ast.Attribute) and "task" in ast.unparse(s) for s in sides
                )
                literal = any(isinstance(s, ast.Constant) and s.value in names for s in sides)
                if names_task and literal:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_an_unknown_task_and_a_misplaced_option_are_refused_naming_them() -> None:
    with pytest.raises(ConfigurationError, match=r"^task: 'translate' is not one of 'generate', 'embed'"):
        job_task("translate")
    check_task("rerank", export="openai", requests=RequestConfig(), truncate_prompt_tokens=8)
    with pytest.raises(
        ConfigurationError, match=r"^requests: LoRA adapters and JSON schemas are for generation"
    ):
        check_task("rerank", export=None, requests=RequestConfig(json_schema={"type": "object"}))
    with pytest.raises(ConfigurationError, match=r"^pair_column: only score and rerank jobs have it$"):
        InputColumns.of_task(job_task("embed"), pair="doc")
    assert InputColumns.of_task(job_task("rerank")) == InputColumns(prompt="query", pair="documents")
    assert InputColumns.of_task(job_task("score"), prompt="q") == InputColumns(prompt="q", pair="text_pair")


def test_rerank_rows_are_a_query_and_its_documents_or_the_rows_error() -> None:
    query = plain_row("what?", None, None, custom_id="q")
    assert with_documents(query, ["a", "b"], "documents", 1).payload() == {
        "prompt": "what?", "documents": ["a", "b"], "top_n": 1,
    }  # fmt: skip
    assert with_documents(query, "a", "documents").documents == ["a"]  # one text: one document
    assert with_documents(query, ["a"], "documents", 0).top_n is None  # 0: every document
    for documents, top_n, error in (
        (None, None, "documents: must be a non-empty list of texts, got null"),
        ([], None, "documents: must be a non-empty list of texts, got an empty list"),
        (["a", 3], None, "documents[1]: a document must be a text, got int"),
        (["a", ""], None, "documents[1]: a document must be a text, got empty"),
        (["a"], -1, "top_n must be an integer >= 0, got -1"),
    ):
        assert with_documents(query, documents, "documents", top_n).error == error
    chat = plain_row(None, [{"role": "user", "content": "hi"}], None)
    assert "not chat messages" in (with_documents(chat, ["a"], "documents").error or "")


def test_openai_rerank_lines_are_read_as_vllms_run_batch_reads_them() -> None:
    def line(body: Any, url: str = "/v1/rerank", **extra: Any) -> RowRequest:
        return parse_request(
            {"custom_id": "r", "method": "POST", "url": url, "body": body, **extra}, path="b", line=3
        )

    ok = line({"model": "m", "query": "q", "documents": ["a", "b", "c"], "top_n": 2})
    assert (ok.error, ok.prompt, ok.documents, ok.top_n, ok.model) == (None, "q", ["a", "b", "c"], 2, "m")
    assert endpoint_task({"url": "/v1/rerank"}) == endpoint_task({"url": "/rerank"}) == "rerank"
    assert line({"query": "q", "documents": "a"}, url="/v2/rerank").documents == ["a"]
    assert line({"query": "", "documents": ["a"]}).error == "body.query must be a non-empty string, got empty"
    assert line({"documents": ["a"]}).error == "body.query must be a non-empty string, got null"
    assert (
        line({"query": "q", "documents": [1]}).error
        == "body.documents[0]: a document must be a text, got int"
    )
    assert line({"query": "q", "documents": ["a"], "return_documents": True}).error == (
        "body.return_documents is not supported"
    )
    assert line([1]).error == "body must be a JSON object"
    assert (
        line({"query": "q", "documents": ["a"]}, method="GET").error == "unsupported method 'GET'; use POST"
    )


def test_a_rerank_output_row_becomes_vllms_rerank_response() -> None:
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse

    row = {
        "custom_id": "q1", "prompt_tokens": 12, "error": None,
        "results": [{"index": 2, "relevance_score": 0.75, "document": "c"},
                    {"index": 0, "relevance_score": 0.5, "document": "a"}],
    }  # fmt: skip
    line = rerank_line(row, model="tiny", job_id="j", created=1)
    assert line["custom_id"] == "q1" and line["error"] is None and line["response"]["status_code"] == 200
    body = RerankResponse.model_validate(line["response"]["body"])  # vLLM's own response model
    assert [(r.index, r.relevance_score, r.document.text) for r in body.results] == [
        (2, 0.75, "c"),
        (0, 0.5, "a"),
    ]
    assert body.usage.prompt_tokens == 12 and body.model == "tiny"
    assert line == rerank_line(row, model="tiny", job_id="j", created=1), (
        "a resumed export writes the same ids"
    )
