"""Start-up: how soon a job commits its first shard, cold and on a warm pool, against raw vLLM.

    .venv/bin/python benchmarks/startup.py --reps 2 --write-docs

Side by side in one invocation, on the same 256 prompts (the tiny offline model
unless --model, greedy, --max-tokens tokens each, one engine), alternating within
each repetition:

- raw: `vllm.LLM(...)` started and `generate` over the 256 prompts, in a fresh
  process (imports included): `raw_s`; its engine start alone: `raw_engine_start_s`.
- cold: `prefect-vllm run` with nothing running (the command starts its own Prefect
  server, a local Ray and its engine): seconds from launch to the first committed
  shard (`first_commit_s`) and to the end of the command (`end_to_end_s`).
- warm: the same job on a warm pool (`--pool`) of a long-lived Ray cluster, with a
  running Prefect server (`PREFECT_API_URL`), as a team with warm pools has it.
- recovery: during a warm run, the pool's `VLLM::EngineCore` is SIGKILLed once the
  first shard is committed: seconds from the kill to the next commit.
- no-op and refusal: the cold job run again (every shard committed), and once more
  with another --max-tokens (refused): the whole command's seconds.

Ratios of the medians, against raw vLLM: cold first commit / raw start + generate
(target <= 1.3), warm first commit / the same (<= 0.2), recovery / raw engine start
(<= 1.2), cold end to end / raw start + generate (<= 1.5). The cold runs go first: a
Ray cluster running on the machine would be joined by their `ray.init()`. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from chaos import processes  # noqa: E402
from throughput import run_raw, write_docs  # noqa: E402

TARGETS = {"cold_first_commit": 1.3, "warm_first_commit": 0.2, "recovery": 1.2, "cold_end_to_end": 1.5}


def _env(home: Path, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect_vllm.cli", *args]


def timed_run(
    args: list[str], env: dict[str, str], out: Path, kill_after_first: bool = False
) -> dict[str, Any]:
    """Run `prefect-vllm run`: launch to first commit, to the end, and kill-to-next-commit."""
    log = out.with_suffix(".log")
    t0 = time.monotonic()
    with log.open("w") as sink:  # a pipe nobody reads would fill up and stall the run
        proc = subprocess.Popen(_cli(*args), env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        first = killed = recovered = None
        seen = 0
        while proc.poll() is None:
            count = len(list((out / "_commits").glob("*.json")))
            now = time.monotonic()
            if count and first is None:
                first = now - t0
                if kill_after_first:
                    (core,) = processes("VLLM::EngineCore")
                    os.kill(core, signal.SIGKILL)
                    killed, seen = now, len(list((out / "_commits").glob("*.json")))
            elif killed is not None and recovered is None and count > seen:
                recovered = now - killed
            time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect-vllm run failed ({proc.returncode}); see {log}")
    return {"first_commit_s": first, "end_to_end_s": time.monotonic() - t0, "recovery_s": recovered}


def whole_command_s(args: list[str], env: dict[str, str], expect: int) -> float:
    t0 = time.monotonic()
    done = subprocess.run(_cli(*args), env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != expect:
        raise RuntimeError(f"expected exit {expect}, got {done.returncode}:\n{done.stderr[-2000:]}")
    return time.monotonic() - t0


def cold_rep(model: str, prompts: Path, work: Path, max_tokens: int) -> dict[str, Any]:
    """Raw vLLM, then the cold job, its no-op re-run and a refused re-run (nothing else running)."""
    raw = run_raw(model, prompts, max_tokens, on_cpu=True)
    env = _env(work / "home", None)
    out = work / f"cold-{time.monotonic_ns()}"
    job = _job(prompts, out, model, max_tokens)
    cold = timed_run(job, env, out)
    refused = [*job, "--max-tokens", str(max_tokens + 1)]  # the last --max-tokens wins
    return {
        "raw_s": raw["end_to_end_s"],
        "raw_engine_start_s": raw["engine_start_s"],
        "cold_first_commit_s": cold["first_commit_s"],
        "cold_end_to_end_s": cold["end_to_end_s"],
        "noop_resume_s": whole_command_s(job, env, 0),
        "refusal_s": whole_command_s(refused, env, 2),
    }


def warm_rep(
    model: str, prompts: Path, work: Path, max_tokens: int, address: str, api_url: str
) -> dict[str, Any]:
    """The same job on the warm pool, then once more with its engine SIGKILLed after the first commit."""
    env = _env(work / "home", api_url)
    pool = ["--pool", "bench", "--ray-address", address]
    out = work / f"warm-{time.monotonic_ns()}"
    warm = timed_run([*_job(prompts, out, model, max_tokens), *pool], env, out)
    out = work / f"kill-{time.monotonic_ns()}"
    killed = timed_run([*_job(prompts, out, model, max_tokens), *pool], env, out, kill_after_first=True)
    return {
        "warm_first_commit_s": warm["first_commit_s"],
        "warm_end_to_end_s": warm["end_to_end_s"],
        "recovery_s": killed["recovery_s"],
    }


def _job(prompts: Path, out: Path, model: str, max_tokens: int) -> list[str]:
    return ["run", str(prompts), "--output", str(out), "--model", model, "--max-tokens", str(max_tokens),
            "--ignore-eos", "--temperature", "0", "--shard-size", "64", "--json"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: the tiny model, made offline")
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/benchmarks.md")
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    from prefect_vllm._launch.server import prefect_api
    from prefect_vllm.testing import make_tiny_model, write_sample_prompts

    work = Path(tempfile.mkdtemp(prefix="startup-"))
    model = args.model or str(make_tiny_model(work / "tiny-llama"))
    prompts = write_sample_prompts(work / "prompts.jsonl", n=256)
    # Cold runs first: while a cluster runs here, `ray.init()` would join it instead.
    cold = [cold_rep(model, prompts, work, args.max_tokens) for _ in range(args.reps)]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": os.cpu_count() or 2})
    pool_env = _env(work / "home", None)
    try:
        started = subprocess.run(
            _cli("pool", "start", "bench", "--model", model, "--ray-address", cluster.address),
            env=pool_env, cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        if started.returncode != 0:
            raise RuntimeError(f"pool start failed:\n{started.stderr[-3000:]}")
        with prefect_api() as api_url:
            warm = [warm_rep(model, prompts, work, args.max_tokens, cluster.address, api_url) for _ in cold]
        subprocess.run(
            _cli("pool", "stop", "bench", "--ray-address", cluster.address), env=pool_env, cwd=REPO
        )
    finally:
        cluster.shutdown()
    reps = [{**c, **w} for c, w in zip(cold, warm, strict=True)]
    result: dict[str, Any] = {k: round(statistics.median(r[k] for r in reps), 2) for k in reps[0]}
    raw_total, raw_start = result["raw_s"], result["raw_engine_start_s"]
    measured = {
        "cold_first_commit": result["cold_first_commit_s"] / raw_total,
        "warm_first_commit": result["warm_first_commit_s"] / raw_total,
        "recovery": result["recovery_s"] / raw_start,
        "cold_end_to_end": result["cold_end_to_end_s"] / raw_total,
    }
    result["ratios"] = {k: {"median": round(v, 2), "target": TARGETS[k]} for k, v in measured.items()}
    result["reps"] = args.reps
    print(json.dumps(result), flush=True)
    if args.write_docs:
        write_docs("startup", docs_lines(result))


def docs_lines(result: dict[str, Any]) -> list[str]:
    ratios = result["ratios"]

    def row(name: str, ours: str, key: str) -> str:
        r = ratios[key]
        met = "yes" if r["median"] <= r["target"] else "no"
        return f"| {name} | {ours} | {r['median']:.2f}x | <= {r['target']}x | {met} |"

    return [
        f"Medians of {result['reps']} repetitions; raw vLLM start + 256 prompts took "
        f"{result['raw_s']:.1f} s (its engine start alone {result['raw_engine_start_s']:.1f} s).",
        "",
        "| measure | prefect-vllm | ratio to raw | target | met |",
        "| --- | --- | --- | --- | --- |",
        row(
            "first commit, cold (own server, Ray, engine)",
            f"{result['cold_first_commit_s']:.1f} s",
            "cold_first_commit",
        ),
        row("first commit, warm pool", f"{result['warm_first_commit_s']:.1f} s", "warm_first_commit"),
        row("engine SIGKILL to next commit (warm pool)", f"{result['recovery_s']:.1f} s", "recovery"),
        row("256-prompt job end to end, cold", f"{result['cold_end_to_end_s']:.1f} s", "cold_end_to_end"),
        "",
        f"No-op resume (every shard committed): {result['noop_resume_s']:.2f} s for the whole command; "
        f"a refused re-run (other --max-tokens): {result['refusal_s']:.2f} s. Neither starts a Prefect "
        "server, Ray or an engine.",
    ]


if __name__ == "__main__":
    main()
