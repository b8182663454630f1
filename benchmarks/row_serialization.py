"""How fast one call's rows cross from a shard task to an engine actor, by their type.

Ray pickles an actor call's arguments (cloudpickle). A call carries a shard's rows: up
to `--rows` of them. This times a pickle round trip of one call's rows as plain dicts
(what crossed before issue 27), frozen dataclasses (with and without slots), msgspec
structs pickled, and `GenerateCall` as it crosses today (`EngineRow` msgspec structs,
msgpack-encoded by its `__reduce__`). Prints JSON; no engine, no Ray cluster.

    python benchmarks/row_serialization.py --rows 512 --reps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import ray.cloudpickle as cloudpickle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefect_vllm._engine.protocol import EngineRow, GenerateCall


@dataclasses.dataclass(frozen=True, slots=True)
class SlotsRow:
    prompt: Any = None
    sampling: Any = None
    error: Any = None


@dataclasses.dataclass(frozen=True)
class PlainRow:
    prompt: Any = None
    sampling: Any = None
    error: Any = None


class StructRow(msgspec.Struct, frozen=True, omit_defaults=True):
    prompt: Any = None
    sampling: Any = None
    error: Any = None


def _round_trip_ms(value: Any, reps: int) -> dict[str, float]:
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        pickle.loads(cloudpickle.dumps(value))
        times.append((time.perf_counter() - began) * 1e3)
    return {"median_ms": round(statistics.median(times), 3), "bytes": len(cloudpickle.dumps(value))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    texts = [f"{'word ' * 40}{i}" for i in range(args.rows)]
    sampling = {"max_tokens": 32}
    cases = {
        "dicts (before)": [{"prompt": t, "sampling": sampling} for t in texts],
        "frozen dataclasses, slots": [SlotsRow(prompt=t, sampling=sampling) for t in texts],
        "frozen dataclasses": [PlainRow(prompt=t, sampling=sampling) for t in texts],
        "msgspec structs, pickled": [StructRow(prompt=t, sampling=sampling) for t in texts],
        "GenerateCall of EngineRow, msgpack (today)": GenerateCall(
            rows=[EngineRow(prompt=t, sampling=sampling) for t in texts], seeds=[None] * args.rows
        ),
    }
    results = {name: _round_trip_ms(value, args.reps) for name, value in cases.items()}
    base = results["dicts (before)"]["median_ms"]
    for result in results.values():
        result["ratio_to_dicts"] = round(result["median_ms"] / base, 2)
    print(json.dumps({
        "benchmark": "row_serialization", "rows": args.rows, "reps": args.reps,
        "machine": f"{platform.machine()}, python {platform.python_version()}", "results": results,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
