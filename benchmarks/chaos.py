"""Chaos soak: random kills of engines, actors and the flow process over real jobs.

Each trial runs one job through the real command (`prefect-vllm run`, local Ray,
vLLM on the tiny model) and, while it runs, SIGKILLs at random moments one of:

- an engine (`VLLM::EngineCore`): the actor must crash-exit and be restarted;
- an engine actor process (`ray::VllmEngineActor`): Ray must restart it;
- the flow process itself: the same command is then run again and must resume;
- with `--cluster`, a worker node of a multi-raylet cluster (`ray.cluster_utils.Cluster`:
  a head that runs no engine and two worker nodes): the node hosting an engine is removed
  without warning and a fresh node joins; its engines and shards move.

When the kills of a trial are spent, the job is let finish (re-running it after a
flow kill). The trial passes when every input `custom_id` is in the output
exactly once and every row has generated text (no row was wrongly condemned).
An engine process still alive a minute after its run's flow process was killed is
an orphan; it is counted (and killed) and fails the trial. One JSON line per trial, then
a summary line; exit 1 if any trial failed.

    .venv/bin/python benchmarks/chaos.py --trials 3 --kills 4          # ~8 min here
    .venv/bin/python benchmarks/chaos.py --trials 5 --kills 12 --rows 4000 --max-tokens 32 \
        --max-delay 4 --seed 11                                        # 60 kills, ~16 min
    .venv/bin/python benchmarks/chaos.py --trials 4 --kills 12 --rows 4000 --max-tokens 32 \
        --max-delay 4 --seed 12 --cluster                              # node losses too
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

FAULTS = ("engine", "actor", "flow")
CLUSTER_FAULTS = (*FAULTS, "node")


#: Ray's per-node agents: they outlive a SIGKILLed driver's local cluster by up to a minute.
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def processes(prefix: str | tuple[str, ...]) -> list[int]:
    """PIDs of live processes whose command line starts with `prefix` (or one of them)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if " ".join(proc.info["cmdline"] or []).startswith(prefix):
            found.append(proc.info["pid"])
    return found


def wait_until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def committed(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json"))) if (out / "_commits").exists() else 0


def start(args: list[str], home: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect_vllm.cli", *args], env=env, stdout=sink, stderr=sink
        )


def check_output(out: Path, ids: list[str]) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(out.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    got = Counter(table.column("custom_id").to_pylist()) if table is not None else Counter()
    want = Counter(ids)
    errors = table.column("error").to_pylist() if table is not None else []
    return {
        "rows": sum(got.values()),
        "missing": sum((want - got).values()),
        "duplicated": sum(n - 1 for n in got.values() if n > 1),
        "unexpected": sum((got - want).values()),
        "row_errors": sum(1 for e in errors if e is not None),
    }


def run_trial(
    trial: int, opts: argparse.Namespace, model: Path, work: Path, rng: random.Random
) -> dict[str, Any]:
    from prefect_vllm.testing import write_sample_prompts

    folder = work / f"trial-{trial}"
    prompts = write_sample_prompts(folder / "prompts.jsonl", n=opts.rows, seed=trial)
    ids = [json.loads(line)["custom_id"] for line in prompts.read_text().splitlines()]
    out = folder / "out"
    log = folder / "run.log"
    args = ["run", str(prompts), "--output", str(out), "--model", str(model), "--actors", str(opts.actors),
            "--shard-size", str(opts.shard_size), "--max-tokens", str(opts.max_tokens), "--ignore-eos",
            "--temperature", "0.8", "--seed", str(trial), "--json"]  # fmt: skip
    cluster = _cluster() if opts.cluster else None
    if cluster is not None:
        args += ["--ray-address", cluster.address]
    try:
        return _strike(trial, opts, args, ids, folder, out, log, rng, cluster)
    finally:
        if cluster is not None:
            cluster.shutdown()


def _cluster() -> Any:
    """A head node that runs no engine (no CPUs) and two worker nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def _node_with_an_engine(cluster: Any, rng: random.Random) -> Any:
    """A worker node whose raylet hosts an engine process, or None."""
    import psutil
    from ray._private import ray_constants

    hosting = []
    for node in cluster.worker_nodes:
        raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
        try:
            titles = [" ".join(p.cmdline()) for p in raylet.children(recursive=True)]
        except psutil.Error:
            continue
        if any(t.startswith("VLLM::EngineCore") for t in titles):
            hosting.append(node)
    return rng.choice(hosting) if hosting else None


def _strike(
    trial: int,
    opts: argparse.Namespace,
    args: list[str],
    ids: list[str],
    folder: Path,
    out: Path,
    log: Path,
    rng: random.Random,
    cluster: Any,
) -> dict[str, Any]:
    from prefect_vllm.testing import engine_processes

    faults = CLUSTER_FAULTS if cluster is not None else FAULTS
    kills: Counter[str] = Counter()
    runs = 1
    orphans = 0
    started = time.monotonic()
    proc = start(args, folder / "home", log)
    baseline = committed(out)
    for _ in range(opts.kills):
        # Strike once this run's engines are up and committing, at a random moment.
        if not wait_until(lambda b=baseline, p=proc: committed(out) > b or p.poll() is not None, 900):
            break
        time.sleep(rng.uniform(0.0, opts.max_delay))
        if proc.poll() is not None:
            break
        fault = rng.choice(faults)
        if fault == "flow":
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # The dead driver's engines go away with it (and its local Ray cluster, if any);
            # one still there a minute later is an orphan, and is counted.
            if not wait_until(lambda: not engine_processes(), 60):
                orphans += len(engine_processes())
                for pid in engine_processes():
                    os.kill(pid, signal.SIGKILL)
            if cluster is None:
                # The dead run's workers and actors go with its local cluster. Ray's two
                # agents linger up to a minute (until their GCS reconnect times out) and
                # hold nothing a new cluster needs, so the next run does not wait for them.
                wait_until(lambda: not set(processes("ray::")) - set(processes(AGENTS)), 180)
            proc = start(args, folder / "home", log)
            baseline = committed(out)
            runs += 1
        elif fault == "node":
            node = _node_with_an_engine(cluster, rng)
            if node is None:
                continue
            cluster.remove_node(node, allow_graceful=False)
            cluster.add_node(num_cpus=1)  # the cluster heals, as an autoscaler would
        else:
            pids = (
                engine_processes(("VLLM::EngineCore",))
                if fault == "engine"
                else processes("ray::VllmEngineActor")
            )
            if not pids:
                continue
            os.kill(rng.choice(pids), signal.SIGKILL)
        kills[fault] += 1
    while True:
        code = proc.wait(timeout=1800)
        if code != 1 or runs >= opts.kills + 4:
            break
        proc = start(args, folder / "home", log)  # exit 1: shards left; the same command resumes
        runs += 1
    result = {
        "trial": trial,
        "exit": code,
        "runs": runs,
        "kills": dict(kills),
        "seconds": round(time.monotonic() - started, 1),
        "orphan_engines": orphans,
        **check_output(out, ids),
    }
    result["ok"] = code == 0 and result["missing"] == result["duplicated"] == result["unexpected"] == 0
    result["ok"] = result["ok"] and result["row_errors"] == 0 and orphans == 0
    if result["ok"] and not opts.keep:
        shutil.rmtree(folder)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--kills", type=int, default=4, help="faults injected per trial")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=40)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-delay", type=float, default=6.0, help="most seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the output of passing trials")
    parser.add_argument(
        "--cluster", action="store_true", help="run on a multi-raylet cluster and lose worker nodes too"
    )
    opts = parser.parse_args()

    from prefect_vllm.testing import make_tiny_model

    rng = random.Random(opts.seed)
    work = Path(tempfile.mkdtemp(prefix="prefect-vllm-chaos-"))
    model = make_tiny_model(work / "model")
    results = []
    for trial in range(opts.trials):
        results.append(run_trial(trial, opts, model, work, rng))
        print(json.dumps(results[-1]), flush=True)
    kills: Counter[str] = Counter()
    for r in results:
        kills.update(r["kills"])
    summary = {
        "benchmark": "chaos",
        "trials": len(results),
        "trials_ok": sum(r["ok"] for r in results),
        "kills": dict(kills),
        "kills_total": sum(kills.values()),
        "runs": sum(r["runs"] for r in results),
        "rows": sum(r["rows"] for r in results),
        "missing": sum(r["missing"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "row_errors": sum(r["row_errors"] for r in results),
        "orphan_engines": sum(r["orphan_engines"] for r in results),
        "seconds": round(sum(r["seconds"] for r in results), 1),
        "work": str(work),
    }
    print(json.dumps(summary), flush=True)
    return 0 if summary["trials_ok"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
