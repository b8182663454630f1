"""Throughput: raw vLLM `LLM.generate` against `prefect-vllm run` (1 actor), same prompts, same run.

Prints one JSON line: generated tokens/s of each (engine start excluded) and their
ratio, median and min-max over repetitions (alternating systems).

    .venv/bin/python benchmarks/throughput.py --prompts 4096 --max-tokens 32 --reps 3

Engine settings are the same on both sides: the tiny offline model (unless --model),
float32, eager mode, a 256 MiB KV cache, greedy, `ignore_eos` so every prompt
generates exactly --max-tokens tokens.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def raw_worker(model: str, prompts_path: str, max_tokens: int) -> None:
    """Run in a child process: one `LLM`, one `generate` call over every prompt."""
    from vllm import LLM, SamplingParams

    from prefect_vllm.config import EngineConfig

    prompts = [json.loads(line)["prompt"] for line in Path(prompts_path).read_text().splitlines()]
    kwargs = EngineConfig().engine_kwargs(model, on_cpu=True)
    kwargs.pop("disable_log_stats", None)
    t0 = time.monotonic()
    llm = LLM(**kwargs)
    start_s = time.monotonic() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t1 = time.monotonic()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.monotonic() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(
        json.dumps(
            {
                "tokens": tokens,
                "generation_s": gen_s,
                "engine_start_s": start_s,
                "end_to_end_s": time.monotonic() - t0,
            }
        )
    )


def run_raw(model: str, prompts: Path, max_tokens: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--raw-worker", model, str(prompts), str(max_tokens)]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    # vLLM logs to stdout too, even after our line (shutdown messages): pick ours.
    result = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith('{"tokens"')][-1])
    result["process_s"] = time.monotonic() - t0
    return result


def run_prefect_vllm(
    model: str, prompts: Path, max_tokens: int, workdir: Path, actors: int, shard_size: int
) -> dict[str, float]:
    out_dir = workdir / f"out-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(workdir / "prefect-home")
    cmd = [
        sys.executable, "-m", "prefect_vllm.cli", "run", str(prompts), "--output", str(out_dir),
        "--model", model, "--max-tokens", str(max_tokens), "--ignore-eos", "--temperature", "0",
        "--actors", str(actors), "--shard-size", str(shard_size), "--json",
    ]  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"prefect-vllm run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    commits = [json.loads(p.read_text()) for p in (out_dir / "_commits").glob("*.json")]
    return {
        "commit_fraction": statistics.median(c["write_s"] / c["total_s"] for c in commits),
        "commit_s": statistics.median(c["write_s"] for c in commits),
        "tokens": summary["output_tokens"],
        "generation_s": summary["generation_s"],
        "end_to_end_s": time.monotonic() - t0,
        "flow_wall_s": summary["wall_s"],
    }


def _stats(values: list[float], digits: int = 1) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--model", default=None, help="default: the tiny model, made offline")
    args = parser.parse_args()

    from prefect_vllm.testing import make_tiny_model, write_sample_prompts

    work = Path(tempfile.mkdtemp(prefix="prefect-vllm-bench-"))
    model = args.model or str(make_tiny_model(work / "tiny-llama"))
    prompts = write_sample_prompts(work / "prompts.jsonl", n=args.prompts)
    raw, ours = [], []
    for _ in range(args.reps):
        raw.append(run_raw(model, prompts, args.max_tokens))
        ours.append(run_prefect_vllm(model, prompts, args.max_tokens, work, args.actors, args.shard_size))
    raw_gen = [r["tokens"] / r["generation_s"] for r in raw]
    our_gen = [r["tokens"] / r["generation_s"] for r in ours]
    raw_e2e = [r["tokens"] / r["process_s"] for r in raw]
    our_e2e = [r["tokens"] / r["end_to_end_s"] for r in ours]
    import vllm

    print(
        json.dumps(
            {
                "benchmark": "throughput",
                "prompts": args.prompts,
                "max_tokens": args.max_tokens,
                "actors": args.actors,
                "shard_size": args.shard_size,
                "reps": args.reps,
                "raw_vllm_generation_tokens_per_s": _stats(raw_gen),
                "prefect_vllm_generation_tokens_per_s": _stats(our_gen),
                "generation_ratio": _stats([o / r for o, r in zip(our_gen, raw_gen, strict=True)], 2),
                "raw_vllm_end_to_end_tokens_per_s": _stats(raw_e2e),
                "prefect_vllm_end_to_end_tokens_per_s": _stats(our_e2e),
                "end_to_end_ratio": _stats([o / r for o, r in zip(our_e2e, raw_e2e, strict=True)], 2),
                "raw_engine_start_s": _stats([r["engine_start_s"] for r in raw]),
                "per_shard_commit_s": _stats([r["commit_s"] for r in ours], 3),
                "per_shard_commit_fraction_of_shard_time": _stats([r["commit_fraction"] for r in ours], 3),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                "vllm": vllm.__version__,
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--raw-worker":
        raw_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
