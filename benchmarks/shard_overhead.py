"""Per-shard overhead: the same rows as one shard and as many small shards, 1 actor.

    .venv/bin/python benchmarks/shard_overhead.py --rows 1000 --small 2 --reps 1 --write-docs

Prints one JSON line. Each repetition runs `prefect-vllm run` twice on the same
--rows one-token prompts (greedy, `--max-tokens 1`): once as one shard, once in
shards of --small rows. Overhead per shard = (generation_s with small shards -
generation_s with one shard) / (number of small shards - 1): what each extra shard
costs in Prefect task runs, Ray task scheduling, the actor call, part file and
commit marker. `generation_s` is the summary's (first shard submitted to last
committed). The flow process's peak resident memory is sampled every 0.1 s.

A commit marker records, per shard, the seconds inside its task (`total_s`) and in
the engine call (`generate_s`) and the write (`write_s`): their medians show how
much of a shard's cost is inside the task at all; the rest is task scheduling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REPO, write_docs


def _peak_rss(pid: int, stop: threading.Event, into: list[int]) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        while not stop.is_set():
            into.append(proc.memory_info().rss)
            time.sleep(0.1)
    except psutil.Error:
        return


def run(model: str, prompts: Path, workdir: Path, shard_size: int) -> dict[str, Any]:
    """One `prefect-vllm run`: its summary's timings, per-shard medians, peak RSS."""
    out_dir = workdir / f"out-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(workdir / "prefect-home")
    cmd = [
        sys.executable, "-m", "prefect_vllm.cli", "run", str(prompts), "--output", str(out_dir),
        "--model", model, "--max-tokens", "1", "--temperature", "0", "--actors", "1",
        "--shard-size", str(shard_size), "--json",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_peak_rss, args=(proc.pid, stop, samples), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"prefect-vllm run failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    commits = [json.loads(p.read_text()) for p in (out_dir / "_commits").glob("*.json")]
    return {
        "shards": len(commits),
        "rows": summary["rows_total"],
        "generation_s": summary["generation_s"],
        "end_to_end_s": round(time.monotonic() - t0, 2),
        "peak_rss_mb": round(max(samples, default=0) / 2**20),
        "task_s_median": round(statistics.median(c["total_s"] for c in commits), 4),
        "engine_call_s_median": round(statistics.median(c["generate_s"] for c in commits), 4),
        "write_s_median": round(statistics.median(c["write_s"] for c in commits), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--small", type=int, default=2, help="rows per shard in the many-shards run")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/benchmarks.md")
    args = parser.parse_args()

    from prefect_vllm.testing import make_tiny_model, write_sample_prompts

    work = Path(tempfile.mkdtemp(prefix="prefect-vllm-bench-"))
    model = str(make_tiny_model(work / "tiny-llama"))
    prompts = write_sample_prompts(work / "prompts.jsonl", n=args.rows)
    runs: dict[str, list[dict[str, Any]]] = {"one shard": [], "small shards": []}
    for rep in range(args.reps):
        order = [("one shard", args.rows), ("small shards", args.small)]
        if rep % 2:
            order.reverse()
        for name, size in order:
            runs[name].append(run(model, prompts, work, size))
            print(f"rep {rep + 1}/{args.reps} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)

    per_shard = [
        (small["generation_s"] - one["generation_s"]) / (small["shards"] - 1)
        for one, small in zip(runs["one shard"], runs["small shards"], strict=True)
    ]
    result = {
        "benchmark": "shard_overhead",
        "rows": args.rows,
        "small_shard_rows": args.small,
        "reps": args.reps,
        "runs": runs,
        "overhead_s_per_shard": round(statistics.median(per_shard), 4),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs["small shards"]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(json.dumps(result))
    if args.write_docs:
        write_docs("shard-overhead", docs_lines(result))


def docs_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['rows']} one-token rows, 1 actor, {result['reps']} repetition(s), {result['machine']}.",
        "",
        "| run | shards | generation s | peak flow RSS MB | median s in task | median s in engine call | median s writing |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in result["runs"].items():
        for r in runs:
            lines.append(
                f"| {name} | {r['shards']} | {r['generation_s']:.1f} | {r['peak_rss_mb']} | "
                f"{r['task_s_median']:.3f} | {r['engine_call_s_median']:.3f} | {r['write_s_median']:.3f} |"
            )
    lines += [
        "",
        f"Overhead per extra shard: **{result['overhead_s_per_shard']:.3f} s**; "
        f"flow process peak: **{result['peak_rss_mb']} MB**.",
    ]
    return lines


if __name__ == "__main__":
    main()
