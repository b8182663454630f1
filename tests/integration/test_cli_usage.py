"""Bad usage fails fast with exit 2 and names the problem, before any engine starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": "hi"}) + "\n" for i in range(3)))
    return path


def usage_error(tmp_path: Path, *args: str, api_url: str | None = None) -> str:
    out = tmp_path / "out"
    proc = run_cli(["run", *args, "--output", str(out)], tmp_path / "home", timeout=300, api_url=api_url)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Creating a local Ray instance" not in proc.stderr, "checked too late: Ray was started"
    assert not list(out.glob("part-*")), "bad usage must write nothing"
    return proc.stderr


def test_missing_input_file(tmp_path: Path, tiny_model: Path) -> None:
    err = usage_error(tmp_path, str(tmp_path / "nope.jsonl"), "--model", str(tiny_model))
    assert "nope.jsonl: input file or folder does not exist" in err


def test_missing_prompt_column(tmp_path: Path, prompts: Path, tiny_model: Path) -> None:
    err = usage_error(tmp_path, str(prompts), "--model", str(tiny_model), "--prompt-column", "question")
    assert "column 'question': missing prompt column" in err


def test_model_folder_that_does_not_exist(tmp_path: Path, prompts: Path) -> None:
    err = usage_error(tmp_path, str(prompts), "--model", str(tmp_path / "no-model"))
    assert "no-model' does not exist" in err


def test_malformed_engine_args_json(tmp_path: Path, prompts: Path, tiny_model: Path) -> None:
    err = usage_error(tmp_path, str(prompts), "--model", str(tiny_model), "--engine-args", "{max_num_seqs: 4")
    assert "--engine-args is not valid JSON" in err


def test_invalid_numbers_name_the_field(tmp_path: Path, prompts: Path, tiny_model: Path) -> None:
    err = usage_error(tmp_path, str(prompts), "--model", str(tiny_model), "--max-tokens", "0")
    assert "max_tokens" in err


def test_malformed_line_duplicate_ids_and_empty_input_are_found_in_the_flow(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    """Full-input validation runs in the flow (also for deployments), still before engines."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "prompt": "x"}\n{"custom_id": "b", "prompt": }\n')
    assert "bad.jsonl, line 2: malformed JSON" in usage_error(
        tmp_path, str(bad), "--model", str(tiny_model), api_url=prefect_server
    )
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"custom_id": "a", "prompt": "x"}\n{"custom_id": "a", "prompt": "y"}\n')
    assert "duplicate ids, e.g. 'a'" in usage_error(
        tmp_path, str(dup), "--model", str(tiny_model), api_url=prefect_server
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "the input has no rows" in usage_error(
        tmp_path, str(empty), "--model", str(tiny_model), api_url=prefect_server
    )


def test_request_options_are_checked_before_engines_start(
    tmp_path: Path, prompts: Path, tiny_model: Path, prefect_server: str
) -> None:
    """A malformed or invalid --json-schema, a missing --lora-dir, an OpenAI Batch line
    without a custom_id: exit 2 naming the file, line and field."""
    schema = tmp_path / "schema.json"
    schema.write_text('{\n  "type": "object",\n  "properties": {"a": }\n}\n')
    err = usage_error(tmp_path, str(prompts), "--model", str(tiny_model), "--json-schema", str(schema))
    assert "schema.json, line 3: not valid JSON" in err
    schema.write_text('{"type": "no-such-type"}')
    err = usage_error(tmp_path, str(prompts), "--model", str(tiny_model), "--json-schema", str(schema))
    assert "json_schema: Value error, not a valid JSON schema" in err
    err = usage_error(
        tmp_path, str(prompts), "--model", str(tiny_model), "--lora-dir", str(tmp_path / "none")
    )
    assert "lora_dir: " in err and "is not a folder" in err
    batch = tmp_path / "batch.jsonl"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}
    batch.write_text(json.dumps(line) + "\n" + json.dumps({**line, "custom_id": ""}) + "\n")
    err = usage_error(tmp_path, str(batch), "--model", str(tiny_model), api_url=prefect_server)
    assert "batch.jsonl, line 2, column 'custom_id': must be a non-empty string" in err


def test_actors_that_cannot_fit_a_local_cluster_fail_at_once(
    tmp_path: Path, prompts: Path, tiny_model: Path, prefect_server: str
) -> None:
    """Not a 15-minute wait for nodes that a cluster this run started will never get."""
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model)]
    proc = run_cli(
        [*args, "--actors", "2", "--cpus-per-actor", "100000"], tmp_path / "home", timeout=300,
        api_url=prefect_server,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 engine actors reserve 200000 CPU in all, but this Ray cluster has" in proc.stderr
    assert "--cpus-per-actor" in proc.stderr.splitlines()[-1]
    assert "engine(s) started" not in proc.stderr and not list(out.glob("part-*"))
