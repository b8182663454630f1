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

from prefect_vllm._store.checkpoint import CheckpointStore
from prefect_vllm._store.lock import LOCK, STALE_S, JobLock, check_not_running
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


def test_a_lock_file_left_by_a_dead_process_is_taken_at_once_on_a_local_folder(tmp_path: Path) -> None:
    """The kernel lock dies with its holder: a leftover record, whoever it names, holds nothing."""
    out = tmp_path / "out"
    out.mkdir()
    record = {"job_id": "j", "token": "old", "owner": "x", "host": "another-host", "pid": 1,
              "started_at": 0, "heartbeat_at": time.time()}  # fmt: skip
    (out / LOCK).write_text(json.dumps(record))
    check_not_running(store(tmp_path))
    with JobLock(store(tmp_path), "j", owner="new"):
        assert json.loads((out / LOCK).read_text())["owner"] == "new"
    assert not (out / LOCK).exists()


def test_a_killed_holder_frees_the_lock_and_a_live_one_is_seen_by_a_look(tmp_path: Path) -> None:
    code = (
        "import sys, time; from prefect_vllm._store.checkpoint import CheckpointStore; "
        "from prefect_vllm._store.lock import JobLock; "
        "JobLock(CheckpointStore(sys.argv[1]), 'j', owner='holder').acquire(); print('held', flush=True); "
        "time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(JobRunningError, match=r"job 'j' is already running \(holder, pid"):
            check_not_running(store(tmp_path))
        with pytest.raises(JobRunningError, match="holder"):
            JobLock(store(tmp_path), "j", owner="second").acquire()
    finally:
        holder.kill()
        holder.wait()
    with JobLock(store(tmp_path), "j", owner="after"):
        pass


def test_runs_that_take_the_lock_at_the_same_instant_get_it_once(tmp_path: Path) -> None:
    """Eight processes try at one agreed moment, while the winner holds it; exactly one holds it."""
    (tmp_path / "out").mkdir()
    at, hold_s = time.time() + 8, 5
    code = (
        "import sys, time; from prefect_vllm._store.checkpoint import CheckpointStore; "
        "from prefect_vllm._store.lock import JobLock; from prefect_vllm.exceptions import JobRunningError; "
        "lock = JobLock(CheckpointStore(sys.argv[1]), 'j', owner=sys.argv[3]); "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); tried = time.time()\n"
        "try:\n lock.acquire()\nexcept JobRunningError:\n print('refused', tried)\n"
        f"else:\n print('held', tried); time.sleep({hold_s}); lock.release()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out"), str(at), f"run {i}"],
                         stdout=subprocess.PIPE, text=True)
        for i in range(8)
    ]  # fmt: skip
    answers = [p.communicate(timeout=120)[0].split() for p in procs]
    assert sorted(a[0] for a in answers) == ["held"] + ["refused"] * 7, answers
    assert max(float(a[1]) for a in answers) < at + hold_s, "a process tried after the holder let go"


def test_an_advisory_lock_on_an_object_store_is_taken_over_from_a_dead_or_silent_holder() -> None:
    """Object stores have no kernel lock: the record's process and heartbeat decide."""
    import pyarrow.fs as pafs

    fs = pafs._MockFileSystem()
    fs.create_dir("bucket/out")
    remote = CheckpointStore("bucket/out", filesystem=fs)
    assert not remote.is_local

    def leave(record: dict[str, object]) -> None:
        with fs.open_output_stream(f"bucket/out/{LOCK}") as f:
            f.write(json.dumps(record).encode())

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = {"job_id": "j", "token": "old", "owner": "x", "host": socket.gethostname(),
              "pid": int(dead.stdout), "started_at": 0, "heartbeat_at": time.time()}  # fmt: skip
    leave(record)
    with JobLock(remote, "j", owner="new"), pytest.raises(JobRunningError, match="new"):
        JobLock(remote, "j", owner="second").acquire()
    elsewhere = {**record, "host": "another-host", "pid": 1}
    leave(elsewhere)
    with pytest.raises(JobRunningError, match="on another-host"):
        check_not_running(remote)
    leave({**elsewhere, "heartbeat_at": time.time() - STALE_S - 1})
    with JobLock(remote, "j", owner="new"):
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
    assert "| throughput | 80.0 tokens/s end to end, 100.0 while generating |" in text
    pooled = summary_markdown(
        summary.model_copy(update={"output_tokens": 0}), "again", task="embed", rows_run=40
    )
    assert "| throughput | 4.0 rows/s end to end, 5.0 while running |" in pooled, pooled
    assert "tokens" not in pooled, "embeddings make no tokens"
