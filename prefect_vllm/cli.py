"""The `prefect-vllm` command: `run`, `status`, `cancel`, `pool` and `make-tiny-model`.

Exit status: 0 when every row has a committed result, 1 when shards remain
incomplete (a re-run resumes them) or the engines failed, 2 for bad usage or
configuration, reported before any engine starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from prefect_vllm._cli.cancel import add_cancel_parser, cancel
from prefect_vllm._cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    add_actor_flags,
    add_engine_flags,
)
from prefect_vllm._cli.common import fail as _fail
from prefect_vllm._cli.pool import add_pool_parser, run_pool_command
from prefect_vllm._cli.status import add_status_parser, status

if TYPE_CHECKING:
    from pydantic import BaseModel


def _default(model: type[BaseModel], field: str) -> Any:
    """A config model's default for `field`: the one place it is declared."""
    default = model.model_fields[field].default
    return f"{default:g}" if isinstance(default, float) else default


def _parser() -> argparse.ArgumentParser:
    from prefect_vllm._job_tasks import JOB_TASKS
    from prefect_vllm._version import __version__
    from prefect_vllm.config import RecoveryConfig as recovery
    from prefect_vllm.config import SamplingConfig as sampling

    parser = argparse.ArgumentParser(prog="prefect-vllm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prefect-vllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a batch job")
    run.add_argument("input", help="JSONL, Parquet or CSV file, folder, or glob")
    run.add_argument("--output", required=True, help="output folder or pyarrow.fs URI")
    run.add_argument(
        "--model", required=True, help="Hugging Face id, local model folder, or vllm-model/BLOCK_NAME"
    )
    run.add_argument(
        "--prompt-column", "--text-column", dest="prompt_column", default=None,
        help="the prompt, or the text to embed, classify or score (default prompt); rerank: the "
        "query (default query)",
    )  # fmt: skip
    run.add_argument(
        "--text-pair-column", dest="pair_column", default=None,
        help="score: the column of each pair's second text (default text_pair); rerank: each "
        "query's documents, a list of texts (default documents)",
    )  # fmt: skip
    run.add_argument("--messages-column", default="messages", help="chat messages column (default messages)")
    run.add_argument("--id-column", default="custom_id")
    run.add_argument("--shard-size", type=int, default=512, help="rows per shard (default 512)")
    add_actor_flags(run)
    add_engine_flags(run)
    # Sampling and recovery flags are None unless typed: the config models own the
    # defaults, and a typed default is honoured (over a model block's sampling, too).
    run.add_argument(
        "--max-job-restarts",
        type=int,
        help=f"engine restarts per run (default {_default(recovery, 'max_job_restarts')})",
    )
    run.add_argument(
        "--poison-after",
        type=int,
        help=f"deaths alone that condemn a row (default {_default(recovery, 'poison_after')})",
    )
    run.add_argument(
        "--hang-timeout", type=float,
        help=f"call deadline floor, seconds (default {_default(recovery, 'hang_timeout_s')})",
    )  # fmt: skip
    run.add_argument(
        "--hang-timeout-per-token", type=float,
        help=f"deadline seconds per token (default {_default(recovery, 'hang_timeout_per_token_s')})",
    )  # fmt: skip
    run.add_argument(
        "--probe-timeout",
        type=float,
        help="seconds a call waits to start before it asks whether its actor answers, and "
        f"that long again for the answer before a frozen actor is killed (default {_default(recovery, 'probe_timeout_s')})",
    )
    run.add_argument(
        "--task", choices=list(JOB_TASKS), default=None,
        help="generate text, embed each prompt (`embedding` column), classify it with a "
        "classifier model (`label`, `probs`), score it against --text-pair-column (`score`), or "
        "rank each query's documents by relevance (`results`, cut to a `top_n` column); "
        "default: what an OpenAI Batch input's url asks for (/v1/embeddings: embed, /v1/rerank: "
        "rerank), else generate",
    )  # fmt: skip
    run.add_argument("--dimensions", type=int, default=None, help="embed: keep the first N dimensions")
    run.add_argument(
        "--truncate-prompt-tokens", type=int, default=None, metavar="N",
        help="embed, classify, score, rerank: cut longer prompts to N tokens as vLLM does (-1: the model's "
        "context) instead of making them row errors",
    )  # fmt: skip
    run.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, default=None,
        help="embed: L2-normalize each vector (default: the model's pooler settings)",
    )  # fmt: skip
    run.add_argument("--max-tokens", type=int, help=f"default {_default(sampling, 'max_tokens')}")
    run.add_argument("--temperature", type=float, help=f"default {_default(sampling, 'temperature')}")
    run.add_argument("--top-p", type=float, help=f"default {_default(sampling, 'top_p')}")
    run.add_argument("--seed", type=int, help=f"default {_default(sampling, 'seed')}")
    run.add_argument("--ignore-eos", action="store_true", default=None, help="generate exactly --max-tokens")
    run.add_argument(
        "--chat-template", default=None, help="Jinja chat template: a file, or the template itself"
    )
    run.add_argument("--chat-template-kwargs", default=None, help="JSON object of chat template variables")
    run.add_argument(
        "--json-schema", default=None, metavar="FILE", help="JSON schema every output must follow"
    )
    run.add_argument("--lora-dir", default=None, help="folder of LoRA adapters that rows name as model")
    run.add_argument(
        "--export", choices=["openai"], default=None, help="also write OpenAI Batch output files"
    )
    run.add_argument("--ray-address", default=None, help="existing Ray cluster (default: local)")
    run.add_argument(
        "--pool", default=None, metavar="NAME", help="generate on this warm pool (prefect-vllm pool start)"
    )
    run.add_argument("--cluster", default=None, help="name of a saved RayCluster block")
    run.add_argument("--storage", default=None, help="name of a saved CheckpointStorage block")
    run.add_argument("--job-id", default=None, help="default: a hash of the job's parameters")
    run.add_argument("--restart", action="store_true", help="discard the job's checkpoints")
    run.add_argument(
        "--verify", action="store_true",
        help="also check every committed part file's sha256 before skipping it (its size always is)",
    )  # fmt: skip
    run.add_argument("--json", action="store_true", help="print the summary as JSON, last line")
    run.add_argument(
        "--verbose", action="store_true",
        help="show vLLM's, Ray's and Prefect's own INFO lines too (tracebacks: PREFECT_VLLM_DEBUG=1)",
    )  # fmt: skip

    add_status_parser(sub)
    add_cancel_parser(sub)

    add_pool_parser(sub)

    from prefect_vllm._models import SHAPES

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random Llama, offline")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--shape", choices=["tiny", *SHAPES], default="tiny",
        help="tiny (default), or random weights in a full-size layout for GPU benchmarks (16 GB)",
    )  # fmt: skip
    tiny.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    tiny.add_argument(
        "--classes", default=None, metavar="A,B,...",
        help="a tiny classifier over these class names (for --task classify) instead of a language "
        "model; one name makes a cross-encoder (for --task score)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prefect-vllm` console script."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        from prefect_vllm._cli.run import run

        return run(args)
    if args.command == "status":
        return status(args)
    if args.command == "cancel":
        return cancel(args)
    if args.command == "pool":
        return run_pool_command(args)
    from prefect_vllm._models import make_tiny_model

    if args.layers is not None and args.layers < 1:
        return _fail(f"--layers must be at least 1, got {args.layers}", EXIT_USAGE)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    print(
        make_tiny_model(args.dir, seed=args.seed, shape=args.shape, num_layers=args.layers, classes=classes)
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
