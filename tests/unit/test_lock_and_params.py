"""The per-job lock, dated paths and the run summary: pure logic over real files."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefect_vllm._checkpoint import CheckpointStore
from prefect_vllm._lock import LOCK, STALE_S, JobLock
from prefect_vllm.exceptions import ConfigurationError, JobRunningError
from prefect_vllm.flows._params import render_dated
from prefect_vllm.flows._report import artifact_key, summary_markdown
from prefect_vllm.results import BatchResult


def store(tmp_path: Path) -> CheckpointStore:
    (tmp_path / "out").mkdir(exist_ok=True)
    return CheckpointStore(str(tmp_path / "out"))


def test_a_second_run_of_a_job_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    first = JobLock(store(tmp_path), "job-1", owner="flow run 'first'")
    with (
        first,
        pytest.raises(JobRunningError, match=r"job 'job-1' is already running \(flow run 'first', pid \d+"),
    ):
        JobLock(store(tmp_path), "job-1", owner="flow run 'second'").acquire()
    assert not (tmp_path / "out" / LOCK).exists(), "released on exit"
    with JobLock(store(tmp_path), "job-1", owner="flow run 'third'"):
        held = json.loads((tmp_path / "out" / LOCK).read_text())
        assert held["owner"] == "flow run 'third'"


def test_a_lock_left_by_a_dead_process_or_a_silent_host_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock_file = tmp_path / "out"
    lock_file.mkdir()
    record = {"job_id": "j", "token": "old", "owner": "x", "host": socket.gethostname(),
              "pid": int(dead.stdout), "started_at": 0, "heartbeat_at": time.time()}  # fmt: skip
    (lock_file / LOCK).write_text(json.dumps(record))
    with JobLock(store(tmp_path), "j", owner="new"):
        pass
    elsewhere = {**record, "host": "another-host", "pid": 1}
    (lock_file / LOCK).write_text(json.dumps(elsewhere))
    with pytest.raises(JobRunningError, match="on another-host"):
        JobLock(store(tmp_path), "j", owner="new").acquire()
    (lock_file / LOCK).write_text(json.dumps({**elsewhere, "heartbeat_at": time.time() - STALE_S - 1}))
    with JobLock(store(tmp_path), "j", owner="new"):
        pass


def test_dated_paths_take_the_scheduled_day_and_refuse_other_fields() -> None:
    when = dt.datetime(2026, 3, 1, 2, 0, tzinfo=dt.timezone.utc)
    assert render_dated("/data/{yesterday}/in.jsonl", when) == "/data/2026-02-28/in.jsonl"
    assert render_dated("s3://b/out/{date}", when) == "s3://b/out/2026-03-01"
    assert render_dated("/plain/path", when) == "/plain/path"
    with pytest.raises(ConfigurationError, match=r"only \{date\} and \{yesterday\}"):
        render_dated("/data/{month}/x", when)


def test_artifact_keys_and_the_summary_say_where_the_output_is_and_how_to_resume() -> None:
    assert artifact_key("Nightly_Job.2", "progress") == "prefect-vllm-nightly-job-2-progress"
    summary = BatchResult(
        job_id="abc", shards_total=4, shards_skipped=1, shards_run=2, shards_incomplete=["000003"],
        rows_total=100, rows_ok=70, rows_failed=5, engine_restarts=1, wall_s=10, generation_s=8,
        output_tokens=800, tokens_per_s=80, generation_tokens_per_s=100, output="/data/out",
    )  # fmt: skip
    text = summary_markdown(summary, "run it again")
    assert "**incomplete**: 1 shards not committed" in text and "`/data/out`" in text
    assert "100 (70 ok, 5 row errors)" in text and "To resume or re-run: run it again" in text
