"""vLLM's own engine layout, the one a GPU runs, on CPU: the same contracts as the forked one.

A tensor-parallel engine (`--tensor-parallel-size 2`) is a spawned `VLLM::EngineCore`
and two spawned workers (`VLLM::Worker_TP0`, `VLLM::Worker_TP1`) on vLLM's multiprocess
executor; `distributed_executor_backend: "mp"` with one rank is a spawned EngineCore and
one `VLLM::Worker` (`test_engine_death.py` kills its EngineCore). One tensor-parallel
run carries every fault, so each engine start is paid once: a poison row that kills its
workers, then a worker SIGKILLed, then a worker SIGSTOPped until the call's deadline
fires; every row is in the output once, the deaths are named by cause, greedy texts
equal raw vLLM's on the same layout, and no `VLLM::` process is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import psutil
import pytest

from prefect_vllm._engine.cpu import THREADS_BIND_ENV, threads_binding
from prefect_vllm._engine.deaths import HANG_CAUSE
from prefect_vllm.testing import POISON_ENGINE_ARGS, POISON_MARKER, write_sample_prompts
from tests.helpers import (
    engine_processes,
    finish,
    input_ids,
    markers,
    no_engine_left,
    read_output,
    start_cli,
    summary_of,
    wait_for,
)
from tests.pooling import RawVllm, call

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ROWS = 64
#: One row a shard: a poison row's shard is the row alone, so isolating it costs one or
#: two engine deaths (alone; or beside another shard, then alone), not three.
SHARD_ROWS = 1
MAX_TOKENS = 48
HANG_TIMEOUT_S = 15
#: The first row carries the poison marker: its shard is isolated and committed before
#: the kills, so no other row can be running alone when one lands (with `--poison-after
#: 1`, a row that dies alone once is a poison row, whoever killed its engine).
POISON_ROW = 0
#: A worker of a multiprocess engine killed by a signal, as its actor names the death
#: (vLLM logs the death as soon as it sees it, sometimes before the status is there).
WORKER_KILLED = re.compile(r"worker VllmWorker-\d (killed by SIGKILL|died \(exit status not known yet.*\))")


def poisoned_prompts(path: Path) -> tuple[Path, str]:
    """ROWS prompts, POISON_ROW marked; the prompts file and the poisoned custom id."""
    write_sample_prompts(path, n=ROWS)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[POISON_ROW]["prompt"] = f"Tell me about {POISON_MARKER} now."
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, str(records[POISON_ROW]["custom_id"])


def start_layout_job(
    tmp_path: Path, tiny_model: Path, api_url: str, layout: list[str], engine_args: dict[str, object]
) -> tuple[Path, str, Path, Path, subprocess.Popen[str]]:
    prompts, poison = poisoned_prompts(tmp_path / "prompts.jsonl")
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = start_cli(
        ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), *layout,
         "--engine-args", json.dumps({**POISON_ENGINE_ARGS, **engine_args}), "--poison-after", "1",
         "--shard-size", str(SHARD_ROWS), "--max-tokens", str(MAX_TOKENS), "--ignore-eos",
         "--temperature", "0", "--hang-timeout", str(HANG_TIMEOUT_S), "--hang-timeout-per-token", "0",
         "--probe-timeout", "10", "--json"],
        tmp_path / "home",
        log,
        api_url=api_url,
    )  # fmt: skip
    wait_for(lambda: markers(out) or proc.poll() is not None, 900, "the first committed shard")
    assert proc.poll() is None, log.read_text()[-3000:]
    return prompts, poison, out, log, proc


def workers(ranks: int) -> list[int]:
    """The engine's worker pids by rank, once all `ranks` of one engine run."""
    found = {}
    for pid in engine_processes(("VLLM::Worker",)):
        try:
            title = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        match = re.match(r"VLLM::Worker(?:_TP(\d))?", title)
        if match:
            found[int(match.group(1) or 0)] = pid
    return [found[r] for r in range(ranks)] if len(found) == ranks else []


def restarted(old: set[int], out: Path, committed: int, ranks: int, proc: subprocess.Popen[str]) -> list[int]:
    """Once a new engine runs (none of `old` among its workers) and has committed a
    shard more than `committed`: its workers by rank."""
    now = workers(ranks)
    if proc.poll() is not None:
        raise AssertionError("the run ended before its engine was restarted")
    return now if now and not set(now) & old and len(markers(out)) > committed else []


def check_output(
    prompts: Path, poison: str, out: Path, done: subprocess.CompletedProcess[str], raw_texts: dict[str, str]
) -> dict[str, object]:
    """Every row once, the poison row an error, every other text raw vLLM's; the summary."""
    assert done.returncode == 0, done.stderr[-4000:]
    summary = summary_of(done)
    assert summary["poisoned_rows"] == [poison], summary
    assert (summary["rows_ok"], summary["rows_failed"]) == (ROWS - 1, 1)
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    rows = {r["custom_id"]: r for r in table.to_pylist()}
    assert "engine died while generating this row" in rows.pop(poison)["error"]
    assert {r["completion_tokens"] for r in rows.values()} == {MAX_TOKENS}
    texts = {cid: r["text"] for cid, r in rows.items()}
    assert texts == {cid: raw_texts[cid] for cid in texts}, "greedy texts differ from raw vLLM's"
    no_engine_left()
    return summary


def raw_greedy_texts(raw: RawVllm, model: Path, prompts: Path, llm: dict[str, object]) -> dict[str, str]:
    """Raw `vllm.LLM(**llm)`'s greedy texts for every prompt, by custom id."""
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    binding = threads_binding(2, sorted(os.sched_getaffinity(0)))  # one NUMA node: bound by hand
    answers = raw.answers(
        model,
        llm,
        {"texts": call("generate", [r["prompt"] for r in records], max_tokens=MAX_TOKENS, temperature=0,
                       ignore_eos=True)},
        env={THREADS_BIND_ENV: binding} if llm.get("tensor_parallel_size", 1) != 1 else {},
    )  # fmt: skip
    return {r["custom_id"]: text for r, (text, _tokens) in zip(records, answers["texts"], strict=True)}


def test_a_tensor_parallel_engine_survives_a_killed_worker_a_stopped_worker_and_a_poison_row(
    tmp_path: Path, tiny_model: Path, prefect_server: str, raw_vllm: RawVllm
) -> None:
    prompts, poison, out, log, proc = start_layout_job(
        tmp_path, tiny_model, prefect_server, ["--tensor-parallel-size", "2"], {}
    )
    poisoned = out / "_commits" / "000000.json"
    wait_for(lambda: poisoned.exists() or proc.poll() is not None, 600, "the poison row's shard committed")
    assert proc.poll() is None, log.read_text()[-3000:]
    # Restarted after the poison row's deaths and serving again: two workers, one EngineCore.
    at_poison = len(markers(out))
    first = wait_for(lambda: restarted(set(), out, at_poison, 2, proc), 600, "the restarted engine")
    assert len(engine_processes(("VLLM::EngineCore",))) == 1, engine_processes()
    committed = len(markers(out))
    os.kill(first[1], signal.SIGKILL)
    second = wait_for(lambda: restarted(set(first), out, committed, 2, proc), 600, "an engine after the kill")
    os.kill(second[0], signal.SIGSTOP)  # alive, no progress: only the call's deadline sees it
    done = finish(proc, log)
    raw = raw_greedy_texts(raw_vllm, tiny_model, prompts, {"tensor_parallel_size": 2})
    summary = check_output(prompts, poison, out, done, raw)
    assert "hang:" in done.stderr, "the actor's deadline did not fire"
    causes = dict(summary["engine_deaths_by_cause"])  # type: ignore[call-overload]
    assert causes.pop(HANG_CAUSE) == 1, summary
    # The poison row's deaths (it kills the workers it reaches), then the killed worker.
    assert causes and all(WORKER_KILLED.fullmatch(cause) for cause in causes), summary
    assert sum(causes.values()) == summary["engine_restarts"] - 1 >= 2, summary
    assert not psutil.pid_exists(second[0]) or psutil.Process(second[0]).status() == psutil.STATUS_ZOMBIE
