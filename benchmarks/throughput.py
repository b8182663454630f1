"""Throughput: raw vLLM, `prefect-vllm run` (1, 2, 4 actors) and Ray Data LLM, same prompts, same run.

    .venv/bin/python benchmarks/throughput.py --prompts 16384 --max-tokens 32 --reps 2 \
        --actors 1,2,4 --plot docs/throughput.png --write-docs

Prints one JSON line: for each system, generated tokens/s during generation and end
to end (median and min-max over --reps repetitions; the systems alternate within
each repetition), and the ratios against raw vLLM and against Ray Data LLM.

Every system runs the same engine on the same prompt file: the tiny offline model
(unless --model), eager mode, a 256 MiB KV cache on CPU, greedy, `ignore_eos` so
every prompt generates exactly --max-tokens tokens.

- raw: `vllm.LLM(...).generate(all prompts)` in a fresh process. During generation =
  the `generate` call; end to end = the process, imports and engine start included.
- prefect-vllm: `prefect-vllm run --actors N` in a fresh process (local Prefect server,
  local Ray cluster). During generation = the summary's `generation_s` (first shard
  submitted to last shard committed: reading input, writing part files and commit
  markers included); end to end = the process.
- ray-data: `ray.data.llm` with one vLLM engine replica, Parquet output, in a fresh
  process (local Ray cluster). During generation = from the first request queued in
  the engine to the last token generated, by vLLM's own per-request timestamps (Ray
  Data's stream has no "engine ready" mark); end to end = the process.

On a GPU machine pass --model and --gpu: the same script measures there.

Engine layouts: by default prefect-vllm's CPU engine is one process forked from its
actor, raw vLLM's is its own spawned EngineCore and worker. `--engine-args
'{"distributed_executor_backend": "mp"}'` gives both vLLM's spawned layout;
`--tensor-parallel-size 2` gives both a tensor-parallel engine (two workers; on CPU
each worker's threads on its share of the cores, on GPUs one GPU per worker). Both
flags reach every system alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"


#: The engine settings every system gets: `--tensor-parallel-size` and `--engine-args`
#: (set in `main`, passed to the worker processes as JSON).
_LAYOUT: dict[str, Any] = {"tensor_parallel_size": 1, "engine_args": {}}


def _engine_kwargs(model: str, on_cpu: bool) -> dict[str, Any]:
    from prefect_vllm.config import EngineConfig

    kwargs = EngineConfig(**_LAYOUT).engine_kwargs(model, on_cpu=on_cpu)
    kwargs.pop("disable_log_stats", None)
    tp = int(kwargs["tensor_parallel_size"])
    if on_cpu and tp > 1 and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        # vLLM's CPU build binds one NUMA node per worker and refuses on fewer nodes.
        from prefect_vllm._engine.cpu import THREADS_BIND_ENV, threads_binding

        os.environ[THREADS_BIND_ENV] = threads_binding(tp, sorted(os.sched_getaffinity(0)))
    return kwargs


def _read_prompts(path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines()]


def raw_worker(model: str, prompts_path: str, max_tokens: int, on_cpu: bool) -> dict[str, Any]:
    """In a child process: one `LLM`, one `generate` call over every prompt."""
    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    prompts = _read_prompts(prompts_path)
    t_start = time.monotonic()
    llm = LLM(**_engine_kwargs(model, on_cpu))
    start_s = time.monotonic() - t_start
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t1 = time.monotonic()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.monotonic() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "tokens": tokens,
        "generation_s": gen_s,
        "engine_start_s": start_s,
        "in_process_s": time.monotonic() - t0,
    }


def ray_data_worker(model: str, prompts_path: str, max_tokens: int, on_cpu: bool) -> dict[str, Any]:
    """In a child process: Ray Data LLM over the prompt file into Parquet, one engine replica."""
    t0 = time.monotonic()
    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ray.init(include_dashboard=False, log_to_driver=False)
    kwargs = _engine_kwargs(model, on_cpu)
    kwargs.pop("model")
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=kwargs,
        concurrency=1,
        batch_size=64,
        # The engine tokenizes and detokenizes itself, as in the other two systems.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        # vLLM's Ray metrics logger needs ray[serve]; the other systems log no stats either.
        log_engine_metrics=False,
        placement_group_config={"bundle_per_worker": {"CPU": 1} if on_cpu else {"GPU": 1}},
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {
            "prompt": row["prompt"],
            "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
        },
        # vLLM's own per-request timestamps (engine-core clock): postprocess runs when
        # Ray Data schedules it, often long after the row was generated.
        postprocess=lambda row: {
            "custom_id": row["custom_id"],
            "text": row["generated_text"],
            "tokens": len(row["generated_tokens"]),
            "queued_ts": row["metrics"]["queued_ts"],
            "last_token_ts": row["metrics"]["last_token_ts"],
        },
    )
    out = Path(tempfile.mkdtemp(prefix="ray-data-out-"))
    processor(ray.data.read_json(prompts_path)).write_parquet(str(out))
    table = pq.read_table(out, columns=["tokens", "queued_ts", "last_token_ts"])
    ray.shutdown()
    return {
        "tokens": sum(table.column("tokens").to_pylist()),
        "generation_s": max(table.column("last_token_ts").to_pylist())
        - min(table.column("queued_ts").to_pylist()),
        "in_process_s": time.monotonic() - t0,
    }


def _worker_result(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {**(env if env is not None else os.environ), "PV_BENCH_LAYOUT": json.dumps(_LAYOUT)}
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[2:4]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    # vLLM and Ray log to stdout too, even after our line: pick ours.
    result = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith('{"tokens"')][-1])
    result["end_to_end_s"] = time.monotonic() - t0
    return result


def run_raw(model: str, prompts: Path, max_tokens: int, on_cpu: bool) -> dict[str, Any]:
    return _worker_result(
        [sys.executable, __file__, "--worker", "raw", model, str(prompts), str(max_tokens), str(on_cpu)]
    )


def run_ray_data(model: str, prompts: Path, max_tokens: int, on_cpu: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return _worker_result(
        [sys.executable, __file__, "--worker", "ray-data", model, str(prompts), str(max_tokens), str(on_cpu)],
        env,
    )


_STARTED_LINE = re.compile(r"the engine itself: ([\d., ]+) s")


def run_prefect_vllm(
    model: str, prompts: Path, max_tokens: int, workdir: Path, actors: int, shard_size: int, gpu: bool
) -> dict[str, Any]:
    out_dir = workdir / f"out-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(workdir / "prefect-home")
    cmd = [
        sys.executable, "-m", "prefect_vllm.cli", "run", str(prompts), "--output", str(out_dir),
        "--model", model, "--max-tokens", str(max_tokens), "--ignore-eos", "--temperature", "0",
        "--actors", str(actors), "--shard-size", str(shard_size), "--json",
    ]  # fmt: skip
    tp = int(_LAYOUT["tensor_parallel_size"])
    cmd += ["--tensor-parallel-size", str(tp), "--engine-args", json.dumps(_LAYOUT["engine_args"])]
    if gpu:
        cmd += ["--gpus-per-actor", str(tp)]
    else:  # CPU engines share the machine's cores: N actors of 1 CPU each would not fit on fewer cores
        cmd += ["--cpus-per-actor", str(min(1.0, (os.cpu_count() or 1) / actors))]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"prefect-vllm run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    commits = [json.loads(p.read_text()) for p in (out_dir / "_commits").glob("*.json")]
    starts = _STARTED_LINE.search(out.stdout + out.stderr)
    return {
        "tokens": summary["output_tokens"],
        "generation_s": summary["generation_s"],
        "end_to_end_s": time.monotonic() - t0,
        "timings": summary.get("timings") or {},
        "engine_start_s": max(float(s) for s in starts.group(1).split(",")) if starts else None,
        "commit_s": statistics.median(c["write_s"] for c in commits),
        "commit_fraction": statistics.median(c["write_s"] / c["total_s"] for c in commits),
    }


def _stats(values: list[float], digits: int = 1) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def _rates(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "generation_tokens_per_s": _stats([r["tokens"] / r["generation_s"] for r in runs]),
        "end_to_end_tokens_per_s": _stats([r["tokens"] / r["end_to_end_s"] for r in runs]),
        "end_to_end_s": _stats([r["end_to_end_s"] for r in runs]),
    }


def _ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Per repetition a/b of tokens per `key` seconds (the systems ran side by side)."""
    return _stats([(x["tokens"] / x[key]) / (y["tokens"] / y[key]) for x, y in zip(a, b, strict=True)], 2)


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars of tokens/s by system (median, min-max whiskers): during generation and end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "generation_tokens_per_s", "during generation"),
        (axes[1], "end_to_end_tokens_per_s", "end to end"),
    ):
        names = [n for n in systems if systems[n].get(key)]  # a figure left out is not drawn
        med = [systems[n][key]["median"] for n in names]
        err = [
            [m - systems[n][key]["min"] for n, m in zip(names, med, strict=True)],
            [systems[n][key]["max"] - m for n, m in zip(names, med, strict=True)],
        ]
        colors = ["#4c72b0" if n.startswith("prefect-vllm") else "#999999" for n in names]
        ax.bar(names, med, yerr=err, capsize=4, color=colors)
        ax.set_title(f"generated tokens/s, {title}")
        ax.tick_params(axis="x", rotation=25)
        for i, m in enumerate(med):
            ax.annotate(f"{m:,.0f}", (i, m), ha="center", va="bottom", fontsize=8)
    fig.suptitle(
        f"{result['prompts']} prompts x {result['max_tokens']} tokens, {result['machine']} "
        f"(median of {result['reps']}, whiskers min-max)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: The summary's `timings` keys, as the docs table names them.
_PHASES = {
    "prefect_server_start_s": "Prefect server start (local, started by the command)",
    "plan_s": "planning: read input, plan shards, manifest, job lock",
    "ray_start_s": "Ray start (local cluster)",
    "engine_start_s": "engine start (actor scheduled, worker process, imports, engine ready)",
    "finalise_s": "finalisation: pool and Ray shutdown, summary, artifacts",
}


def docs_section(result: dict[str, Any], plot_path: str | None) -> list[str]:
    """The markdown that --write-docs puts between the throughput markers."""

    def fmt(s: dict[str, float], digits: int = 0) -> str:
        return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"

    lines = [
        f"{result['prompts']} prompts x {result['max_tokens']} tokens, {result['reps']} repetitions "
        f"(systems alternating), {result['machine']}, vLLM {result['vllm']}, Ray {result['ray']}.",
        "",
        "| system | generated tokens/s during generation | end to end tokens/s | end to end s |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in result["systems"].items():
        lines.append(
            f"| {name} | {fmt(s['generation_tokens_per_s'])} | {fmt(s['end_to_end_tokens_per_s'])} "
            f"| {fmt(s['end_to_end_s'], 1)} |"
        )
    lines += [
        "",
        "| ratio (per repetition, median and min-max) | during generation | end to end |",
        "| --- | --- | --- |",
    ]
    for name, r in result["ratios"].items():
        lines.append(f"| {name} | {fmt(r['generation'], 2)} | {fmt(r['end_to_end'], 2)} |")
    if result.get("overhead"):
        lines += ["", "Where prefect-vllm's fixed time goes (1 actor, median seconds):", ""]
        lines += ["| phase | s |", "| --- | --- |"]
        lines += [f"| {_PHASES.get(k, k)} | {v:.2f} |" for k, v in result["overhead"].items()]
    if plot_path:
        lines += ["", f"![throughput by system and actors]({plot_path})"]
    return lines


def write_docs(marker: str, lines: list[str]) -> None:
    """Replace the `marker` section of docs/benchmarks.md: the command that ran, then `lines`."""
    args = " ".join(a for a in sys.argv[1:] if a != "--write-docs")
    section = "\n".join(["```bash", f"python benchmarks/{Path(sys.argv[0]).name} {args}", "```", "", *lines])
    text = DOCS.read_text()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    head, rest = text.split(begin, 1)
    _old, tail = rest.split(end, 1)
    DOCS.write_text(f"{head}{begin}\n{section}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--actors", default="1", help="comma-separated actor counts, e.g. 1,2,4")
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--systems", default="raw,prefect-vllm,ray-data")
    parser.add_argument("--model", default=None, help="default: the tiny model, made offline")
    parser.add_argument("--gpu", action="store_true", help="engines on GPUs (one per actor)")
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="workers per engine, every system"
    )
    parser.add_argument("--engine-args", default="{}", help="JSON engine arguments, every system")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart here")
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/benchmarks.md")
    args = parser.parse_args()

    import ray
    import vllm

    from prefect_vllm.testing import make_tiny_model, write_sample_prompts

    _LAYOUT.update(tensor_parallel_size=args.tensor_parallel_size, engine_args=json.loads(args.engine_args))
    systems = args.systems.split(",")
    actor_counts = [int(a) for a in args.actors.split(",")]
    work = Path(tempfile.mkdtemp(prefix="prefect-vllm-bench-"))
    model = args.model or str(make_tiny_model(work / "tiny-llama"))
    prompts = write_sample_prompts(work / "prompts.jsonl", n=args.prompts)
    on_cpu = not args.gpu
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        order = []
        if "raw" in systems:
            order.append(("raw vLLM", lambda: run_raw(model, prompts, args.max_tokens, on_cpu)))
        if "prefect-vllm" in systems:
            for n in actor_counts:
                order.append((
                    f"prefect-vllm, {n} actor{'s' if n > 1 else ''}",
                    lambda n=n: run_prefect_vllm(model, prompts, args.max_tokens, work, n, args.shard_size, args.gpu),
                ))  # fmt: skip
        if "ray-data" in systems:
            order.append(("Ray Data LLM", lambda: run_ray_data(model, prompts, args.max_tokens, on_cpu)))
        if rep % 2:  # alternate, so neither side always runs on a warmer machine
            order.reverse()
        for name, fn in order:
            runs.setdefault(name, []).append(fn())
            print(f"rep {rep + 1}/{args.reps} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "benchmark": "throughput",
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "shard_size": args.shard_size,
        "reps": args.reps,
        "systems": {name: _rates(r) for name, r in runs.items()},
        "ratios": {},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {'GPU' if args.gpu else 'no GPU'}",
        "layout": dict(_LAYOUT),
        "vllm": vllm.__version__,
        "ray": ray.__version__,
    }
    ours = [name for name in runs if name.startswith("prefect-vllm")]
    for base in ("raw vLLM", "Ray Data LLM"):
        for name in ours:
            if base in runs:
                result["ratios"][f"{name} / {base}"] = {
                    "generation": _ratio(runs[name], runs[base], "generation_s"),
                    "end_to_end": _ratio(runs[name], runs[base], "end_to_end_s"),
                }
    if "Ray Data LLM" in runs and "raw vLLM" in runs:
        result["ratios"]["Ray Data LLM / raw vLLM"] = {
            "generation": _ratio(runs["Ray Data LLM"], runs["raw vLLM"], "generation_s"),
            "end_to_end": _ratio(runs["Ray Data LLM"], runs["raw vLLM"], "end_to_end_s"),
        }
    one = runs.get("prefect-vllm, 1 actor")
    if one:
        timings = [r["timings"] for r in one if r["timings"]]
        overhead = {k: statistics.median(t[k] for t in timings) for k in (timings[0] if timings else {})}
        overhead["per-shard part file + commit marker"] = statistics.median(r["commit_s"] for r in one)
        overhead["generation (all shards)"] = statistics.median(r["generation_s"] for r in one)
        overhead["whole command"] = statistics.median(r["end_to_end_s"] for r in one)
        result["overhead"] = {k: round(v, 3) for k, v in overhead.items()}
    if args.plot:
        plot(result, Path(args.plot))
    print(json.dumps(result))
    if args.write_docs:
        plot_rel = os.path.relpath(Path(args.plot).resolve(), DOCS.parent) if args.plot else None
        write_docs("throughput", docs_section(result, plot_rel))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        _, _, kind, model_arg, prompts_arg, tokens_arg, cpu_arg = sys.argv
        _LAYOUT.update(json.loads(os.environ.get("PV_BENCH_LAYOUT", "{}")))
        worker = raw_worker if kind == "raw" else ray_data_worker
        print(json.dumps(worker(model_arg, prompts_arg, int(tokens_arg), cpu_arg == "True")), flush=True)
    else:
        main()
