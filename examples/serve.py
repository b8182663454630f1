"""Serve `batch_inference` as a deployment: on a schedule, and runnable from the Prefect UI.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python examples/serve.py --name nightly --cron "0 2 * * *" \
        --input "/data/prompts/{yesterday}" --output "nightly/{yesterday}" --model vllm-model/llama \
        --cluster local --storage local-disk

Each scheduled run reads the folder of the day before its scheduled start; a run from
the UI's form can override any parameter. `--cluster` and `--storage` name saved
`RayCluster` and `CheckpointStorage` blocks (`output` is then a path under the storage's
`base_uri`). Ctrl-C stops serving.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect_vllm.flows import batch_inference

if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="nightly", help="deployment name")
    parser.add_argument("--cron", default=None, help="schedule, e.g. '0 2 * * *'; none to run on demand")
    parser.add_argument("--input", default=None, help="default input; {date} and {yesterday} are filled in")
    parser.add_argument("--output", default=None, help="default output; {date} and {yesterday} are filled in")
    parser.add_argument("--model", default=None, help="default model: id, folder or vllm-model/BLOCK_NAME")
    parser.add_argument("--cluster", default=None, help="name of a saved RayCluster block")
    parser.add_argument("--storage", default=None, help="name of a saved CheckpointStorage block")
    parser.add_argument("--limit", type=int, default=None, help="most runs at once")
    args = parser.parse_args()
    given = {
        "input": args.input, "output": args.output, "model": args.model,
        "cluster": args.cluster, "storage": args.storage,
    }  # fmt: skip
    defaults: dict[str, Any] = {k: v for k, v in given.items() if v}
    batch_inference.serve(name=args.name, cron=args.cron, parameters=defaults, limit=args.limit)
