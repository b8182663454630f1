"""Resume cost and planning memory: the flow-process side of checkpoints.

    .venv/bin/python benchmarks/resume.py --shards 10000 --plan-rows 1000000

Prints one JSON line:
- `noop_resume`: `prefect-vllm run` on a job whose --shards shards are all committed
  (markers written here, as a finished run leaves them): the flow's own time to decide
  there is nothing to do (`flow_wall_s`), the whole command's time including the local
  Prefect server start (`process_s`), and whether any engine or Ray started;
- `planning`: `plan_job` over a --plan-rows JSONL file in a fresh process that has
  imported prefect-vllm (as a flow process has): seconds, and that process's peak RSS
  against its RSS before planning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_prompts(path: Path, rows: int) -> Path:
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"custom_id": f"row-{i:09d}", "prompt": f"Tell me about item {i}."}) + "\n")
    return path


def committed_job(work: Path, shards: int) -> tuple[Path, Path, str]:
    """A job of `shards` one-row shards, every one committed, as the CLI would plan it."""
    from prefect_vllm._input.planning import InputColumns, plan_job
    from prefect_vllm._job import job_fingerprint
    from prefect_vllm._store.checkpoint import CheckpointStore, JobManifest, fingerprint_id
    from prefect_vllm.config import EngineConfig, RequestConfig, SamplingConfig
    from prefect_vllm.results import ShardResult
    from prefect_vllm.testing import make_tiny_model

    model = str(make_tiny_model(work / "tiny-llama"))
    prompts = write_prompts(work / "prompts.jsonl", shards)
    columns = InputColumns()
    plan = plan_job(str(prompts), columns, 1)
    fingerprint = job_fingerprint(
        model, plan.files, columns, 1, SamplingConfig(), EngineConfig(), RequestConfig()
    )
    store = CheckpointStore(str(work / "out"))
    store.prepare(
        JobManifest(
            job_id=fingerprint_id(fingerprint), fingerprint=fingerprint, plan=plan, created_at=time.time()
        ),
        restart=False,
    )
    for spec in plan.shards:
        store.commit(
            ShardResult(
                shard_id=spec.shard_id,
                rows=1,
                rows_ok=1,
                rows_failed=0,
                prompt_tokens=8,
                output_tokens=16,
                checksum="0" * 64,
                attempt=1,
                actor_pid=0,
                generate_s=0.1,
                write_s=0.01,
                total_s=0.11,
                committed_at=time.time(),
            )
        )
    return prompts, work / "out", model


def noop_resume(shards: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="prefect-vllm-resume-"))
    prompts, out, model = committed_job(work, shards)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(work / "prefect-home")
    cmd = [sys.executable, "-m", "prefect_vllm.cli", "run", str(prompts), "--output", str(out),
           "--model", model, "--shard-size", "1", "--json"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    process_s = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "shards": shards,
        "shards_skipped": summary["shards_skipped"],
        "flow_wall_s": summary["wall_s"],
        "process_s": round(process_s, 2),
        # The command's own lines (other libraries' INFO lines are not shown without --verbose).
        "ray_or_engine_started": "engine(s) ready" in proc.stderr
        or "starting the vLLM engine(s)" in proc.stderr
        or "VllmEngineActor" in proc.stderr,
    }


def planning_child(path: str) -> None:
    """In a fresh process: plan the file, report time and peak RSS."""
    import prefect_vllm.flows  # noqa: F401 - what a flow process has imported before planning
    from prefect_vllm._input.planning import InputColumns, plan_job

    def status_mb(field: str) -> float:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent.
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
        return 0.0

    before = status_mb("VmRSS:")
    t0 = time.monotonic()
    plan = plan_job(path, InputColumns(), 512)
    seconds = time.monotonic() - t0
    peak = status_mb("VmHWM:")
    print(json.dumps({"rows": plan.rows_total, "shards": len(plan.shards), "seconds": round(seconds, 2),
                      "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1)}))  # fmt: skip


def planning(rows: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="prefect-vllm-plan-"))
    path = write_prompts(work / "prompts.jsonl", rows)
    out = subprocess.run(
        [sys.executable, __file__, "--planning-child", str(path)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["input_mb"] = round(path.stat().st_size / 2**20, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--plan-rows", type=int, default=1_000_000)
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/benchmarks.md")
    args = parser.parse_args()
    result = {
        "benchmark": "resume",
        "noop_resume": noop_resume(args.shards),
        "planning": planning(args.plan_rows),
    }
    print(json.dumps(result))
    if args.write_docs:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from throughput import write_docs

        noop, plan = result["noop_resume"], result["planning"]
        started = "Ray or an engine started" if noop["ray_or_engine_started"] else "no Ray, no engine started"
        write_docs(
            "resume",
            [
                "| measure | figure | target (issue 6) |",
                "| --- | --- | --- |",
                f"| no-op re-run of a {noop['shards']:,}-shard job, all committed: the flow's own time "
                f"(plan, read the markers, decide) | **{noop['flow_wall_s']:.2f} s**; {started} | < 2 s |",
                f"| the same, whole command (process start, imports, local Prefect server start) "
                f"| {noop['process_s']:.1f} s | - |",
                f"| planning {plan['rows']:,} JSONL rows ({plan['input_mb']} MB) into {plan['shards']:,} shards "
                f"| {plan['seconds']:.1f} s | - |",
                f"| flow-process peak RSS while planning them (before planning: {plan['rss_before_mb']:.0f} MB) "
                f"| **{plan['peak_rss_mb']:.0f} MB** | < 300 MB |",
            ],
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--planning-child":
        planning_child(sys.argv[2])
    else:
        main()
