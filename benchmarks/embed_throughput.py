"""Embedding throughput: raw `LLM.embed` against `prefect-vllm run --task embed`, 1 actor, same texts.

    .venv/bin/python benchmarks/embed_throughput.py --texts 50000 --reps 2 --write-docs

Prints one JSON line: rows embedded per second during embedding and end to end for
each system (median and min-max over --reps repetitions; the two alternate within
each repetition, raw first), and the per-repetition ratios prefect-vllm / raw.

Both run the same engine on the same short texts (`write_sample_prompts`): the tiny
offline model unless --model, with vLLM's pooling runner and its embed conversion,
eager mode and a 256 MiB KV cache on CPU.

- raw: `vllm.LLM(..., runner="pooling", convert="embed").embed(all texts)` in a fresh
  process. During embedding = the `embed` call; end to end = the process, imports and
  engine start included.
- prefect-vllm: `prefect-vllm run --task embed --actors 1` in a fresh process (local
  Prefect server, local Ray cluster). During embedding = the summary's `generation_s`
  (first shard submitted to last shard committed: reading input, writing part files
  and commit markers included); end to end = the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REPO, _engine_kwargs, _read_prompts, _stats, _worker_result, write_docs


def raw_worker(model: str, prompts_path: str, on_cpu: bool) -> dict[str, Any]:
    """In a child process: one pooling `LLM`, one `embed` call over every text."""
    t0 = time.monotonic()
    from vllm import LLM

    texts = _read_prompts(prompts_path)
    t_start = time.monotonic()
    llm = LLM(**_engine_kwargs(model, on_cpu), runner="pooling", convert="embed")
    start_s = time.monotonic() - t_start
    t1 = time.monotonic()
    outs = llm.embed(texts, use_tqdm=False)
    embed_s = time.monotonic() - t1
    # The engine stopped, no interpreter teardown (the caller leaves with os._exit): its
    # C++ threads can abort it ("terminate called without an active exception").
    llm.llm_engine.engine_core.shutdown()
    return {
        "tokens": sum(len(o.prompt_token_ids) for o in outs),
        "rows": sum(1 for o in outs if o.outputs.embedding),
        "generation_s": embed_s,
        "engine_start_s": start_s,
        "in_process_s": time.monotonic() - t0,
    }


def run_raw(model: str, prompts: Path, on_cpu: bool) -> dict[str, Any]:
    return _worker_result([sys.executable, __file__, "--worker", model, str(prompts), str(on_cpu)])


def run_prefect_vllm(model: str, prompts: Path, workdir: Path, shard_size: int, gpu: bool) -> dict[str, Any]:
    out_dir = workdir / f"out-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(workdir / "prefect-home")
    cmd = [
        sys.executable, "-m", "prefect_vllm.cli", "run", str(prompts), "--output", str(out_dir),
        "--model", model, "--task", "embed", "--actors", "1", "--shard-size", str(shard_size), "--json",
    ]  # fmt: skip
    if gpu:
        cmd += ["--gpus-per-actor", "1"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"prefect-vllm run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "rows": summary["rows_ok"],
        "generation_s": summary["generation_s"],
        "end_to_end_s": time.monotonic() - t0,
        "timings": summary.get("timings") or {},
    }


def _rates(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "embedding_rows_per_s": _stats([r["rows"] / r["generation_s"] for r in runs]),
        "end_to_end_rows_per_s": _stats([r["rows"] / r["end_to_end_s"] for r in runs]),
        "end_to_end_s": _stats([r["end_to_end_s"] for r in runs]),
    }


def _ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Per repetition a/b of rows per `key` seconds (the two ran side by side)."""
    return _stats([(x["rows"] / x[key]) / (y["rows"] / y[key]) for x, y in zip(a, b, strict=True)], 2)


def docs_lines(result: dict[str, Any]) -> list[str]:
    def fmt(s: dict[str, float]) -> str:
        return f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"

    raw, ours = result["systems"]["raw"], result["systems"]["prefect-vllm"]
    during, end = result["ratio_during_embedding"], result["ratio_end_to_end"]
    return [
        f"{result['texts']:,} texts, 1 actor, {result['reps']} repetition(s), {result['machine']}.",
        "",
        "| system | rows/s during embedding | rows/s end to end | end to end s |",
        "| --- | --- | --- | --- |",
        f"| raw `LLM.embed` | {fmt(raw['embedding_rows_per_s'])} | {fmt(raw['end_to_end_rows_per_s'])} | "
        f"{raw['end_to_end_s']['median']:.1f} |",
        f"| prefect-vllm | {fmt(ours['embedding_rows_per_s'])} | {fmt(ours['end_to_end_rows_per_s'])} | "
        f"{ours['end_to_end_s']['median']:.1f} |",
        "",
        f"prefect-vllm / raw: **{during['median']:.2f}x during embedding** "
        f"({during['min']:.2f}-{during['max']:.2f}; target >= 0.9x), "
        f"**{end['median']:.2f}x end to end** ({end['min']:.2f}-{end['max']:.2f}; target >= 0.8x).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=50000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--model", default=None, help="default: the tiny model, made offline")
    parser.add_argument("--gpu", action="store_true", help="the engine on a GPU")
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/benchmarks.md")
    args = parser.parse_args()

    from prefect_vllm.testing import make_tiny_model, write_sample_prompts

    work = Path(tempfile.mkdtemp(prefix="prefect-vllm-bench-"))
    model = args.model or str(make_tiny_model(work / "tiny-llama"))
    prompts = write_sample_prompts(work / "texts.jsonl", n=args.texts)
    runs: dict[str, list[dict[str, Any]]] = {"raw": [], "prefect-vllm": []}
    for rep in range(args.reps):
        runs["raw"].append(run_raw(model, prompts, on_cpu=not args.gpu))
        runs["prefect-vllm"].append(run_prefect_vllm(model, prompts, work, args.shard_size, args.gpu))
        print(
            f"rep {rep + 1}/{args.reps}: " + json.dumps({k: v[-1] for k, v in runs.items()}), file=sys.stderr
        )
    result = {
        "benchmark": "embed_throughput",
        "texts": args.texts,
        "reps": args.reps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (", GPU" if args.gpu else ""),
        "systems": {name: _rates(r) for name, r in runs.items()},
        "ratio_during_embedding": _ratio(runs["prefect-vllm"], runs["raw"], "generation_s"),
        "ratio_end_to_end": _ratio(runs["prefect-vllm"], runs["raw"], "end_to_end_s"),
    }
    print(json.dumps(result))
    if args.write_docs:
        write_docs("embed-throughput", docs_lines(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _model, _prompts, _cpu = sys.argv[2:5]
        print(json.dumps(raw_worker(_model, _prompts, _cpu == "True")), flush=True)
        os._exit(0)
    else:
        main()
