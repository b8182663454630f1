"""Bad usage fails fast with exit 2 and names the problem, before any engine starts."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import pytest

from prefect_vllm._store.checkpoint import CheckpointStore
from prefect_vllm._store.lock import JobLock
from tests.helpers import run_cli, wait_for_job_events

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
    assert f"input: {tmp_path}/nope.jsonl is no file, folder or glob that exists" in err


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


def refused_alone(tmp_path: Path, *args: str) -> tuple[str, float]:
    """Run the command on bad input with no Prefect server configured: exit 2, and no
    process started on the way (a Prefect server or Ray would be the command's children).
    Its stderr and wall time."""
    import subprocess

    import psutil

    from tests.helpers import cli, cli_env

    out = tmp_path / "out"
    began = time.monotonic()
    proc = subprocess.Popen(
        cli("run", *args, "--output", str(out)), env=cli_env(tmp_path / "home"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    children: set[str] = set()
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            children |= {" ".join(c.cmdline())[:80] for c in parent.children(recursive=True)}
        time.sleep(0.02)
    took = time.monotonic() - began
    _stdout, stderr = proc.communicate()
    assert proc.returncode == 2, stderr[-3000:]
    assert not children, f"started on the way to a refusal: {children}"
    assert not out.exists() or not list(out.iterdir()), "bad input must write nothing"
    assert " | ERROR " not in stderr and "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1], took


def test_malformed_lines_duplicate_ids_and_empty_input_are_refused_before_anything_starts(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Every row is read by the command itself, before a Prefect server, Ray or a flow
    run: a refusal the input alone decides comes in the time the read takes."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "prompt": "x"}\n{"custom_id": "b", "prompt": }\n')
    line, _ = refused_alone(tmp_path, str(bad), "--model", str(tiny_model))
    with pytest.raises(json.JSONDecodeError) as python_says:
        json.loads(bad.read_text().splitlines()[1])
    assert (
        line
        == f"prefect-vllm: error: {bad}, line 2: malformed JSON at column {python_says.value.colno}: Expecting value"
    )
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"custom_id": i, "prompt": "x"}) + "\n" for i in ("a", "b", "a")))
    line, took = refused_alone(tmp_path, str(dup), "--model", str(tiny_model))
    assert line == f"prefect-vllm: error: {dup}, column 'custom_id': duplicate id 'a' on line 1 and line 3"
    assert took < 3, f"a 3-line input took {took:.1f} s to refuse"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line, _ = refused_alone(tmp_path, str(empty), "--model", str(tiny_model))
    assert line.endswith("the input has no rows")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"custom_id": "a", "text": "x"}) + "\n")
    line, _ = refused_alone(tmp_path, str(blank), "--model", str(tiny_model))
    assert line == (
        f"prefect-vllm: error: {blank}, column 'prompt': missing prompt column (or 'messages' column); "
        "the input has ['custom_id', 'text']"
    )
    late = tmp_path / "late.jsonl"  # the first line has a prompt, the third none
    late.write_text("".join(dup.read_text().splitlines(keepends=True)[:2]) + blank.read_text())
    line, _ = refused_alone(tmp_path, str(late), "--model", str(tiny_model))
    assert (
        line == f"prefect-vllm: error: {late}, line 3, column 'prompt': missing prompt field (or 'messages')"
    )


def test_an_output_store_that_cannot_be_reached_is_one_line_for_run_and_status(
    tmp_path: Path, prompts: Path, tiny_model: Path
) -> None:
    from tests.helpers import free_port

    store = f"s3://no-such-bucket/jobs/x?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    done = run_cli(
        ["run", str(prompts), "--output", store, "--model", str(tiny_model)], tmp_path / "home", timeout=120
    )
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"prefect-vllm: error: cannot read {store}: ") and "connect" in line.lower(), line
    status = run_cli(["status", store], tmp_path / "home", timeout=120)
    assert status.returncode == 2 and "Traceback" not in status.stderr, status.stderr[-3000:]
    (line,) = status.stderr.strip().splitlines()
    assert line.startswith(f"prefect-vllm: error: cannot read {store}") and "connect" in line.lower(), line


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
    assert "engine(s) ready" not in proc.stderr and not list(out.glob("part-*"))


def committed_job(tmp_path: Path, prompts: Path, model: Path, max_tokens: int) -> Path:
    """An output folder holding the job of `run PROMPTS --model MODEL --max-tokens N --shard-size 1`
    with every shard committed, as a finished run leaves it (no engine needed)."""
    import pyarrow as pa

    from prefect_vllm._input.planning import InputColumns, plan_job
    from prefect_vllm._job import job_identity
    from prefect_vllm._store.checkpoint import CheckpointStore, JobManifest
    from prefect_vllm.config import EngineConfig, RequestConfig, SamplingConfig
    from prefect_vllm.results import ShardResult

    plan = plan_job(str(prompts), InputColumns(), 1)
    identity = job_identity(
        str(model), plan.files, InputColumns(), 1, SamplingConfig(max_tokens=max_tokens), EngineConfig(),
        RequestConfig(), None,
    )  # fmt: skip
    out = tmp_path / "done"
    store = CheckpointStore(str(out))
    manifest = JobManifest(
        job_id=identity.job_id, fingerprint=identity.fingerprint, plan=plan, created_at=time.time()
    )
    store.prepare(manifest, restart=False)
    for spec in plan.shards:
        checksum, size = store.write_part(
            spec.shard_id, pa.table({"custom_id": [spec.shard_id], "text": ["t"]})
        )
        store.commit(
            ShardResult(
                shard_id=spec.shard_id, rows=1, rows_ok=1, rows_failed=0, prompt_tokens=3, output_tokens=5,
                checksum=checksum, part_bytes=size, attempt=1, actor_pid=0, generate_s=0.1, write_s=0.01,
                total_s=0.11, committed_at=time.time(),
            )
        )  # fmt: skip
    return out


def test_a_finished_job_and_a_refused_one_are_answered_without_a_server_ray_or_engine(
    tmp_path: Path, prompts: Path, tiny_model: Path
) -> None:
    """No PREFECT_API_URL: a command that started anything would log its temporary server."""

    out = committed_job(tmp_path, prompts, tiny_model, max_tokens=7)
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "1"]
    done = run_cli([*args, "--max-tokens", "7", "--json"], tmp_path / "home", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["shards_skipped"], summary["shards_run"], summary["rows_ok"]) == (3, 0, 3)
    assert "every shard is already committed" in done.stderr
    refused = run_cli([*args, "--max-tokens", "8"], tmp_path / "home", timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "sampling.max_tokens (7 -> 8)" in refused.stderr and "--restart" in refused.stderr
    # A live run holds the job: refused as the flow would, still before anything starts.
    with JobLock(CheckpointStore(str(out)), summary["job_id"], owner="flow run 'other'"):
        running = run_cli([*args, "--max-tokens", "7"], tmp_path / "home", timeout=120)
    assert running.returncode == 2 and "is already running (flow run 'other'" in running.stderr
    for proc in (done, refused, running):
        assert "Starting temporary server" not in proc.stderr, "a Prefect server was started"
        assert "Creating a local Ray instance" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists() or not list((tmp_path / "home").glob("*.db")), "no database made"


def test_status_of_a_folder_of_jobs_lists_each_one_and_exits_1_while_one_has_shards_pending(
    tmp_path: Path, prompts: Path, tiny_model: Path
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name, max_tokens in (("day-1", 7), ("day-2", 8)):
        shutil.move(committed_job(tmp_path / name, prompts, tiny_model, max_tokens=max_tokens), jobs / name)
    (jobs / "notes").mkdir()  # a folder without a job is not one
    done = run_cli(["status", str(jobs)], tmp_path / "home", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(": 3/3 shards done, 0 pending; 3 rows ok" in line for line in lines), lines
    assert f"in {jobs / 'day-1'}:" in lines[0] and f"in {jobs / 'day-2'}:" in lines[1]
    (jobs / "day-2" / "_commits" / "000001.json").unlink()
    pending = run_cli(["status", str(jobs), "--json"], tmp_path / "home", timeout=120)
    assert pending.returncode == 1, pending.stderr
    listed = json.loads(pending.stdout)
    assert [(j["output"], j["shards_pending"], j["pending"]) for j in listed] == [
        (str(jobs / "day-1"), 0, []), (str(jobs / "day-2"), 1, ["000001"])
    ]  # fmt: skip
    nothing = run_cli(["status", str(jobs / "notes")], tmp_path / "home", timeout=120)
    assert nothing.returncode == 2 and nothing.stderr.strip().count("\n") == 0, nothing.stderr
    assert "holds no prefect-vllm job" in nothing.stderr


def test_a_refusal_answered_from_the_checkpoints_is_an_event_when_a_server_is_configured(
    tmp_path: Path, prompts: Path, tiny_model: Path, prefect_server: str
) -> None:
    out = committed_job(tmp_path, prompts, tiny_model, max_tokens=7)
    job_id = json.loads((out / "_manifest.json").read_text())["job_id"]
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "1"]
    with JobLock(CheckpointStore(str(out)), job_id, owner="flow run 'other'"):
        running = run_cli(
            [*args, "--max-tokens", "7"], tmp_path / "home", api_url=prefect_server, timeout=120
        )
    assert running.returncode == 2 and "is already running (flow run 'other'" in running.stderr
    (refusal,) = wait_for_job_events(prefect_server, job_id, "prefect-vllm.job.refused")
    assert "is already running (flow run 'other'" in refusal["payload"]["reason"]
    assert {r["prefect.resource.role"] for r in refusal["related"]} == {"model", "output"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
        (["--max-tokens", "-1"], "max_tokens: Input should be greater than or equal to 1"),
        (["--model-is-a-file"], "is a file: give the model's folder"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    tmp_path: Path, prompts: Path, tiny_model: Path, flags: list[str], expected: str
) -> None:
    model = tiny_model / "config.json" if flags == ["--model-is-a-file"] else tiny_model
    extra = [] if flags == ["--model-is-a-file"] else flags
    err = usage_error(tmp_path, str(prompts), "--model", str(model), *extra)
    assert err.strip().splitlines() == [f"prefect-vllm: error: {err.strip().split('error: ', 1)[1]}"]
    assert expected in err
