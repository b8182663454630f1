"""`prefect-vllm pool start|stop|status|list`: warm engine pools from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect_vllm._cli.common import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    add_actor_flags,
    add_engine_flags,
    engine_config,
    fail,
    pool_config,
    validation_message,
)


def add_pool_parser(sub: Any) -> None:
    """The `pool` subcommand and its four actions."""
    pool = sub.add_parser("pool", help="warm engine pools on a long-lived Ray cluster")
    actions = pool.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start a warm pool and wait until its engines run")
    start.add_argument("name")
    start.add_argument("--model", required=True, help="Hugging Face id or local model folder")
    add_actor_flags(start)
    add_engine_flags(start)
    stop = actions.add_parser("stop", help="stop a warm pool: its engines and their processes end")
    stop.add_argument("name")
    status = actions.add_parser("status", help="a warm pool's model, engine settings and actors")
    status.add_argument("name")
    listing = actions.add_parser("list", help="every warm pool on the cluster")
    for parser in (start, stop, status, listing):
        parser.add_argument("--ray-address", default=None, help="the cluster (default: RAY_ADDRESS)")
        parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def run_pool_command(args: argparse.Namespace) -> int:
    """Carry out `prefect-vllm pool ACTION`; exit 2 for bad usage, 1 when engines fail."""
    from pydantic import ValidationError

    from prefect_vllm import pools
    from prefect_vllm.exceptions import ConfigurationError, PrefectVllmError

    try:
        if args.action == "start":
            infos = pools.start_pool(
                args.name, args.model, engine=engine_config(args), config=pool_config(args),
                ray_address=args.ray_address,
            )  # fmt: skip
            answer: Any = {"name": args.name, "model": args.model, "actors": [_actor(i) for i in infos]}
            text = f"warm pool {args.name!r} runs {len(infos)} engine(s) of {args.model}: " + ", ".join(
                f"pid {i['pid']} started in {i['start_s']:.1f} s" for i in infos
            )
        elif args.action == "stop":
            stopped = pools.stop_pool(args.name, ray_address=args.ray_address)
            answer = {"name": args.name, "stopped": stopped}
            text = f"warm pool {args.name!r} stopped ({stopped} engine actor(s))"
        elif args.action == "status":
            answer = pools.pool_status(args.name, ray_address=args.ray_address)
            text = _describe(answer)
        else:
            answer = pools.list_pools(ray_address=args.ray_address)
            text = "\n".join(_describe(p) for p in answer) or "no warm pools on this cluster"
    except ValidationError as exc:
        return fail(validation_message(exc), EXIT_USAGE)
    except ConfigurationError as exc:
        return fail(str(exc), EXIT_USAGE)
    except PrefectVllmError as exc:
        return fail(str(exc), EXIT_INCOMPLETE)
    print(json.dumps(answer) if args.json else text, flush=True)
    return EXIT_OK


def _actor(info: dict[str, Any]) -> dict[str, Any]:
    return {"pid": info["pid"], "start_s": round(info["start_s"], 3), "max_model_len": info["max_model_len"]}


def _describe(pool: dict[str, Any]) -> str:
    states = ", ".join(
        f"{a['index']}: {a['state']}"
        + (f" pid {a['pid']}" if a["pid"] else "")
        + (f", GPUs {','.join(a['gpus'])} on node {a['node'][:8]}" if a.get("gpus") else "")
        + f", {a['restarts']} restarts"
        for a in pool["actors"]
    )
    return f"{pool['name']}: {pool['model']} ({states})"
