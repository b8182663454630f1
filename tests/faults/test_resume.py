"""Resume from checkpoints alone: a killed flow process, a fresh Prefect database, Ray giving up."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_batch, write_sample_prompts
from tests.helpers import (
    engine_processes,
    finish,
    input_ids,
    markers,
    no_engine_left,
    part_digests,
    ray_processes,
    read_output,
    run_cli,
    start_cli,
    summary_of,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_ctrl_c_stops_the_run_within_seconds_and_the_next_run_completes_exactly(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    """SIGINT after two commits, as Ctrl-C sends it: exit 130 soon, nothing left running."""
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=240, seed=21)  # 15 shards
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "16",
            "--max-tokens", "48", "--ignore-eos", "--temperature", "0", "--json"]  # fmt: skip
    log = tmp_path / "run-1.log"
    # A terminal's foreground job gets SIGINT with its default action, whatever the
    # test runner's own shell did with it.
    proc = start_cli(args, tmp_path / "home", log, api_url=prefect_server, sigint=True)
    wait_for(lambda: len(markers(out)) >= 2 or proc.poll() is not None, 900, "two committed shards")
    interrupted_at = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stopped = finish(proc, log, timeout=60)
    took = time.monotonic() - interrupted_at
    assert stopped.returncode == 130, stopped.stderr[-4000:]
    assert took < 30, f"the command took {took:.0f} s to stop"
    wait_for(lambda: not engine_processes() and not ray_processes(), 30, "the run's engines and Ray to exit")
    committed = len(markers(out))
    assert 2 <= committed < 15, committed
    # What was kept, in the last line; no ERROR line from Prefect for a run stopped on purpose.
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"prefect-vllm: stopped: {committed} of 15 shards committed in {out}; "
        "run the same command again to resume"
    ), stopped.stderr[-3000:]
    assert "Crash detected" not in stopped.stderr and " | ERROR " not in stopped.stderr, stopped.stderr[
        -3000:
    ]

    resumed = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = summary_of(resumed)
    assert (summary["shards_skipped"], summary["shards_run"]) == (committed, 15 - committed)
    assert Counter(read_output(out).column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    no_engine_left()


def test_killed_flow_process_resumes_skipping_committed_shards(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    """SIGKILL the flow after 2+ commits; the re-run, on a new Prefect database, skips them.

    The input is an OpenAI Batch file exported with `--export openai`: the resumed
    job's export holds each request exactly once.
    """
    prompts = write_sample_batch(tmp_path / "batch.jsonl", n=320)  # 20 shards
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "16",
            "--max-tokens", "64", "--ignore-eos", "--temperature", "0.8", "--export", "openai", "--json"]  # fmt: skip
    proc = start_cli(args, tmp_path / "home-1", tmp_path / "run-1.log")
    wait_for(lambda: len(markers(out)) >= 2 or proc.poll() is not None, 900, "two committed shards")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The killed driver's Ray cluster and engines go away with it; only then is the set of
    # markers final (a shard task could still be committing).
    wait_for(
        lambda: not ray_processes() and not engine_processes(), 120, "the dead run's Ray processes to exit"
    )
    committed_before = part_digests(out)
    n_before = len(markers(out))
    assert 2 <= n_before < 20, n_before
    assert not (out / "_openai").exists(), "an incomplete job has no export"
    committed_before = {
        k: v for k, v in committed_before.items() if (out / "_commits" / f"{k[5:-8]}.json").exists()
    }

    resumed = run_cli(args, tmp_path / "home-2")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = summary_of(resumed)
    assert summary["shards_skipped"] == n_before
    assert summary["shards_run"] == 20 - n_before
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    after = part_digests(out)
    assert {k: after[k] for k in committed_before} == committed_before, "a committed shard was rewritten"
    exported = [
        json.loads(line)["custom_id"]
        for name in ("output.jsonl", "errors.jsonl")
        for line in (out / "_openai" / name).read_text().splitlines()
    ]
    assert Counter(exported) == Counter(input_ids(prompts)), "each custom_id exactly once in the export"
    assert summary["request_counts"] == {"total": 320, "completed": 320, "failed": 0}

    changed = run_cli([*args[:-1], "--max-tokens", "32", "--job-id", summary["job_id"]], tmp_path / "home-2")
    assert changed.returncode == 2
    assert "sampling.max_tokens (64 -> 32)" in changed.stderr and "--restart" in changed.stderr
    assert "Starting temporary server" not in changed.stderr, "a refusal starts nothing"
    fresh = run_cli([*args, "--max-tokens", "8", "--restart"], tmp_path / "home-2", api_url=prefect_server)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (summary_of(fresh)["shards_skipped"], summary_of(fresh)["shards_run"]) == (0, 20)
    assert set(read_output(out).column("completion_tokens").to_pylist()) == {8}
    no_engine_left()


def test_run_ends_with_exit_1_when_ray_gives_up_and_the_next_run_completes(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    """With no restart budget, a killed engine leaves shards incomplete; a re-run finishes them."""
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=200)  # 10 shards
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "20",
            "--max-tokens", "64", "--ignore-eos", "--temperature", "0", "--json"]  # fmt: skip
    log = tmp_path / "run-1.log"
    proc = start_cli([*args, "--max-restarts", "0"], tmp_path / "home", log, api_url=prefect_server)
    wait_for(lambda: markers(out) or proc.poll() is not None, 900, "the first committed shard")
    cores = engine_processes(("VLLM::EngineCore",))
    assert cores, log.read_text()[-3000:]
    os.kill(cores[0], signal.SIGKILL)
    failed = finish(proc, log)
    assert failed.returncode == 1, failed.stderr[-4000:]
    summary = summary_of(failed)
    assert summary["shards_incomplete"]
    assert "were not committed" in failed.stderr and summary["shards_incomplete"][0] in failed.stderr
    assert "run the same command again" in failed.stderr
    n_before = len(markers(out))
    assert n_before + len(summary["shards_incomplete"]) == 10

    resumed = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert summary_of(resumed)["shards_skipped"] == n_before
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    no_engine_left()
