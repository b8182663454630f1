"""vLLM's own engine layout, the one a GPU runs, on CPU: the same contracts as the forked one.

A tensor-parallel engine (`--tensor-parallel-size 2`) is a spawned `VLLM::EngineCore`
and two spawned workers (`VLLM::Worker_TP0`, `VLLM::Worker_TP1`) on vLLM's multiprocess
executor; `distributed_executor_backend: "mp"` with one rank is a spawned EngineCore and
one `VLLM::Worker` (`test_engine_death.py` kills its EngineCore). One tensor-parallel
run carries the faults, so each engine start is paid once: a worker SIGKILLed, then a
worker SIGSTOPped until the call's deadline fires; every row is in the output once, the
deaths are named by cause, greedy texts equal raw vLLM's on the same layout, and no
`VLLM::` process is left.

Poison rows are not part of this run: with kills landing from outside, a row running
alone when one lands would be blamed for it (the poison budget counts deaths, not who
caused them), and a poison row on this layout costs three more engine starts.
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
from prefect_vllm.testing import write_sample_prompts
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

ROWS = 180
SHARD_ROWS = 12
MAX_TOKENS = 16
#: Long enough for a fresh tensor-parallel engine's first call on a busy 2-core machine
#: (its warm-up took over 15 s in a CI run), short enough to wait for once.
HANG_TIMEOUT_S = 30
#: A worker of a multiprocess engine killed by a signal, as its actor names the death
#: (vLLM logs the death as soon as it sees it, sometimes before the status is there).
WORKER_KILLED = re.compile(r"worker VllmWorker-\d (killed by SIGKILL|died \(exit status not known yet.*\))")


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


def serving(old: set[int], out: Path, ranks: int, proc: subprocess.Popen[str]) -> list[int]:
    """Once an engine none of whose workers is in `old` has committed a shard itself (its
    actor's pid is in a commit marker: it is past its start, serving): its workers by rank."""
    if proc.poll() is not None:
        raise AssertionError("the run ended before its engine served again")
    now = workers(ranks)
    if not now or set(now) & old:
        return []
    try:
        actor = psutil.Process(psutil.Process(now[0]).ppid()).ppid()  # worker -> EngineCore -> actor
    except psutil.Error:
        return []
    served = set()
    for marker in markers(out):
        try:
            served.add(json.loads(marker.read_text())["actor_pid"])
        except (OSError, ValueError, KeyError):
            continue
    return now if actor in served else []


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


def test_a_tensor_parallel_engine_survives_a_killed_worker_and_a_stopped_worker(
    tmp_path: Path, tiny_model: Path, prefect_server: str, raw_vllm: RawVllm
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=ROWS)
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = start_cli(
        ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--tensor-parallel-size", "2",
         "--shard-size", str(SHARD_ROWS), "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--temperature", "0",
         "--hang-timeout", str(HANG_TIMEOUT_S), "--hang-timeout-per-token", "0", "--probe-timeout", "10",
         "--json"],
        tmp_path / "home",
        log,
        api_url=prefect_server,
    )  # fmt: skip
    first = wait_for(lambda: serving(set(), out, 2, proc), 900, "the first committed shard")
    assert len(engine_processes(("VLLM::EngineCore",))) == 1, engine_processes()
    os.kill(first[1], signal.SIGKILL)
    second = wait_for(lambda: serving(set(first), out, 2, proc), 600, "the restarted engine serving")
    os.kill(second[0], signal.SIGSTOP)  # alive, no progress: only the call's deadline sees it

    done = finish(proc, log)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "hang:" in done.stderr, "the actor's deadline did not fire"
    summary = summary_of(done)
    assert (summary["rows_ok"], summary["rows_failed"], summary["poisoned_rows"]) == (ROWS, 0, []), summary
    causes = dict(summary["engine_deaths_by_cause"])
    assert causes.pop(HANG_CAUSE, 0) >= 1, summary  # the stopped worker's engine
    assert list(causes) and all(WORKER_KILLED.fullmatch(cause) for cause in causes), summary
    assert sum(causes.values()) >= 1 and summary["engine_restarts"] >= 2, summary
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert set(table.column("completion_tokens").to_pylist()) == {MAX_TOKENS}
    texts = dict(zip(table.column("custom_id").to_pylist(), table.column("text").to_pylist(), strict=True))
    raw = raw_greedy_texts(raw_vllm, tiny_model, prompts, {"tensor_parallel_size": 2})
    assert texts == raw, "greedy texts differ from raw vLLM's on the same layout"
    no_engine_left()
    assert not psutil.pid_exists(second[0]) or psutil.Process(second[0]).status() == psutil.STATUS_ZOMBIE
