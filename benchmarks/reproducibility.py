"""Reproducibility of sampled text: the same seeded job cut into other shards, on other actor counts.

    .venv/bin/python benchmarks/reproducibility.py --rows 2000 --write-docs

Runs one sampled job (temperature 1, job seed 7, so every row has its own seed
derived from the job seed and its custom_id) as each of --layouts (shard size x
actors), each a fresh `prefect-vllm run` on the tiny offline model, and counts the
rows whose text is identical in every layout. Prompts are ~50 tokens, so a batch
of them overflows one engine step and vLLM spreads prompts over steps. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from throughput import write_docs  # noqa: E402


def texts(model: str, prompts: Path, out: Path, shard_size: int, actors: int, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(work / "home")
    cpus = str(min(1.0, (os.cpu_count() or 1) / actors))
    cmd = [
        sys.executable, "-m", "prefect_vllm.cli", "run", str(prompts), "--output", str(out), "--model", model,
        "--max-tokens", "16", "--temperature", "1", "--seed", "7", "--shard-size", str(shard_size),
        "--actors", str(actors), "--cpus-per-actor", cpus, "--json",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    if summary["engine_restarts"]:
        raise RuntimeError(f"an engine died: {summary['engine_restarts']} restarts")
    table = ds.dataset(str(out), format="parquet", exclude_invalid_files=True).to_table()
    return dict(zip(table.column("custom_id").to_pylist(), table.column("text").to_pylist(), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--layouts", default="200x1,50x1,100x2", help="SHARD_SIZExACTORS, comma-separated")
    parser.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    args = parser.parse_args()

    from prefect_vllm.testing import make_tiny_model, write_sample_prompts

    work = Path(tempfile.mkdtemp(prefix="repro-"))
    model = str(make_tiny_model(work / "tiny-llama"))
    prompts = write_sample_prompts(work / "prompts.jsonl", n=args.rows)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    prompts.write_text("".join(json.dumps({**r, "prompt": " ".join([r["prompt"]] * 4)}) + "\n" for r in rows))
    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]
    runs = [texts(model, prompts, work / f"out-{s}x{a}", s, a, work) for s, a in layouts]
    identical = sum(1 for cid in runs[0] if all(run[cid] == runs[0][cid] for run in runs))
    result: dict[str, Any] = {"rows": len(runs[0]), "layouts": args.layouts, "identical_rows": identical}
    print(json.dumps(result), flush=True)
    if args.write_docs:
        write_docs(
            "reproducibility",
            [
                f"{identical} of {result['rows']} sampled rows (temperature 1, per-row seeds) have the same "
                f"text in every layout (shard size x actors: {args.layouts.replace(',', ', ')}); no engine died.",
            ],
        )


if __name__ == "__main__":
    main()
