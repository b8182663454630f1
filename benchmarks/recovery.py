"""Recovery: time from an engine SIGKILL to the next committed shard, against a clean engine start.

    .venv/bin/python benchmarks/recovery.py --reps 3 --write-docs

Each repetition runs `prefect-vllm run` (1 actor, the tiny model, shards of
--shard-size) and, once --after shards are committed, SIGKILLs the actor's
`VLLM::EngineCore`. Prints one JSON line:

- `recovery_s`: from the kill to the first shard committed after it (the actor
  crash-exits, Ray restarts it, a fresh engine starts, the interrupted shards run
  again from their first row);
- `clean_engine_start_s`: the same run's first engine start (actor constructor,
  from the run's summary `timings.engine_start_s`, Ray worker start included);
- `shard_interval_s`: the median time between commits before the kill, the part
  of `recovery_s` that is the interrupted shard's own work;
- `target_s`: clean engine start + 5 s (issue 6), and whether the median met it.

Every repetition also checks that the output is complete: each `custom_id` once.
"""

from __future__ import annotations

import argparse
import itertools
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

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from chaos import processes  # noqa: E402
from throughput import write_docs  # noqa: E402


def markers(out: Path) -> list[dict[str, Any]]:
    found = []
    for path in (out / "_commits").glob("*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being written
    return found


def one_recovery(model: str, prompts: Path, work: Path, shard_size: int, after: int) -> dict[str, Any]:
    out = work / f"out-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(work / "prefect-home")
    cmd = [
        sys.executable, "-m", "prefect_vllm.cli", "run", str(prompts), "--output", str(out),
        "--model", model, "--max-tokens", "32", "--ignore-eos", "--temperature", "0",
        "--actors", "1", "--shard-size", str(shard_size), "--json",
    ]  # fmt: skip
    log = (work / f"run-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO)
    killed_at = None
    while proc.poll() is None:
        if killed_at is None and len(markers(out)) >= after:
            engines = processes("VLLM::EngineCore")
            if engines:
                os.kill(engines[0], signal.SIGKILL)
                killed_at = time.time()
        time.sleep(0.05)
    stdout = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0 or killed_at is None:
        raise RuntimeError(f"run failed ({proc.returncode}) or ended before the kill; log: {log.name}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    commits = sorted(m["committed_at"] for m in markers(out))
    before = [t for t in commits if t < killed_at]
    after_kill = [t for t in commits if t > killed_at]
    ids = [
        i
        for part in sorted(out.glob("part-*.parquet"))
        for i in pq.read_table(part).column("custom_id").to_pylist()
    ]
    if len(ids) != len(set(ids)) or len(ids) != summary["rows_total"]:
        raise RuntimeError(f"output not exactly once: {len(ids)} rows, {len(set(ids))} distinct")
    return {
        "recovery_s": after_kill[0] - killed_at,
        "clean_engine_start_s": summary["timings"]["engine_start_s"],
        "shard_interval_s": statistics.median(b - a for a, b in itertools.pairwise(before))
        if len(before) > 1
        else None,
        "engine_restarts": summary["engine_restarts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--after", type=int, default=3, help="kill once this many shards are committed")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    from prefect_vllm.testing import make_tiny_model, write_sample_prompts

    work = Path(tempfile.mkdtemp(prefix="prefect-vllm-recovery-"))
    model = str(make_tiny_model(work / "tiny-llama"))
    prompts = write_sample_prompts(work / "prompts.jsonl", n=args.prompts)
    runs = []
    for rep in range(args.reps):
        runs.append(one_recovery(model, prompts, work, args.shard_size, args.after))
        print(f"rep {rep + 1}/{args.reps}: {runs[-1]}", file=sys.stderr, flush=True)

    def stats(key: str) -> dict[str, float]:
        values = [r[key] for r in runs if r[key] is not None]
        return {
            "median": round(statistics.median(values), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
        }

    result = {
        "benchmark": "recovery",
        "reps": args.reps,
        "recovery_s": stats("recovery_s"),
        "clean_engine_start_s": stats("clean_engine_start_s"),
        "shard_interval_s": stats("shard_interval_s"),
        "target_s": round(statistics.median(r["clean_engine_start_s"] for r in runs) + 5, 1),
    }
    result["target_met"] = result["recovery_s"]["median"] <= result["target_s"]
    print(json.dumps(result))
    if args.write_docs:

        def fmt(s: dict[str, float]) -> str:
            return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"

        write_docs(
            "recovery",
            [
                "| measure (median, min-max over repetitions) | s |",
                "| --- | --- |",
                f"| engine SIGKILL to the next committed shard | **{fmt(result['recovery_s'])}** |",
                f"| clean engine start in the same runs | {fmt(result['clean_engine_start_s'])} |",
                f"| time between commits before the kill | {fmt(result['shard_interval_s'])} |",
                f"| target: clean start + 5 s | {result['target_s']:.1f} ({'met' if result['target_met'] else 'missed'}) |",
            ],
        )


if __name__ == "__main__":
    main()
