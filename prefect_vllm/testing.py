"""Helpers for tests, demos and failure rehearsals that users can reuse.

Everything here works offline: the tiny model is random weights plus a BPE
tokenizer trained on a built-in corpus, so no hub download ever happens.

Examples:
    Make a tiny model and generate with it through the command line:

    ```python
    from prefect_vllm.testing import make_tiny_model, write_sample_prompts

    model_dir = make_tiny_model("/tmp/tiny-llama")
    prompts = write_sample_prompts("/tmp/prompts.jsonl", n=16)
    # prefect-vllm run /tmp/prompts.jsonl --output /tmp/out --model /tmp/tiny-llama
    ```
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect_vllm._corpus import CORPUS_WORDS
from prefect_vllm._engine.markers import POISON_MARKER, POISON_RAISE_MARKER
from prefect_vllm._models import CHAT_TEMPLATE, make_tiny_lora, make_tiny_model

if TYPE_CHECKING:
    from prefect_vllm._engine.poison import PoisonLogitsProcessor

__all__ = [
    "CHAT_TEMPLATE",
    "POISON_ENGINE_ARGS",
    "POISON_MARKER",
    "POISON_RAISE_MARKER",
    "PoisonLogitsProcessor",
    "engine_processes",
    "make_tiny_lora",
    "make_tiny_model",
    "write_sample_batch",
    "write_sample_prompts",
]

#: Engine arguments that load `PoisonLogitsProcessor` into every engine, e.g.
#: `prefect-vllm run ... --engine-args '{"logits_processors": ["prefect_vllm.testing:PoisonLogitsProcessor"]}'`.
POISON_ENGINE_ARGS: dict[str, Any] = {"logits_processors": ["prefect_vllm.testing:PoisonLogitsProcessor"]}


def __getattr__(name: str) -> Any:
    """`PoisonLogitsProcessor` imports vLLM and torch, so it loads only when asked for.

    It is a vLLM logits processor that SIGKILLs its engine process as soon as a
    prompt containing `POISON_MARKER` joins the batch: a real poison row for
    rehearsing failures, with no patch to prefect-vllm's code.

    Examples:
        ```python
        from prefect_vllm.config import EngineConfig
        from prefect_vllm.testing import POISON_ENGINE_ARGS, POISON_MARKER

        engine = EngineConfig(engine_args=POISON_ENGINE_ARGS)
        poison_prompt = f"Tell me about {POISON_MARKER}."  # kills any engine it reaches
        ```
    """
    if name == "PoisonLogitsProcessor":
        from prefect_vllm._engine.poison import PoisonLogitsProcessor

        return PoisonLogitsProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sample_prompts(n: int, seed: int) -> Iterator[str]:
    """`n` short prompts of random corpus words, the same for the same seed."""
    import random

    rng = random.Random(seed)
    for _ in range(n):
        words = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 12)))
        yield f"Tell me about {words}."


def write_sample_prompts(
    path: str | os.PathLike[str], n: int = 64, *, seed: int = 0, id_prefix: str = "req"
) -> Path:
    """Write `n` sample prompts as JSONL with `custom_id` and `prompt` fields.

    Examples:
        ```python
        from prefect_vllm.testing import write_sample_prompts

        p = write_sample_prompts("/tmp/prompts.jsonl", n=4)
        assert len(p.read_text().splitlines()) == 4
        ```
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(_sample_prompts(n, seed)):
            record = {"custom_id": f"{id_prefix}-{i:06d}", "prompt": prompt}
            f.write(json.dumps(record) + "\n")
    return out


def write_sample_batch(
    path: str | os.PathLike[str], n: int = 64, *, seed: int = 0, model: str = "tiny-llama"
) -> Path:
    """Write `n` OpenAI Batch requests, alternating chat and text completions.

    Examples:
        ```python
        import json

        from prefect_vllm.testing import write_sample_batch

        p = write_sample_batch("/tmp/batch.jsonl", n=4)
        first = json.loads(p.read_text().splitlines()[0])
        assert first["url"] == "/v1/chat/completions"
        ```
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(_sample_prompts(n, seed)):
            body: dict[str, Any] = {"model": model}
            if i % 2 == 0:
                url = "/v1/chat/completions"
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                url, body["prompt"] = "/v1/completions", prompt
            record = {
                "custom_id": f"req-{i:06d}",
                "method": "POST",
                "url": url,
                "body": body,
            }
            f.write(json.dumps(record) + "\n")
    return out


def engine_processes(kinds: tuple[str, ...] = ("VLLM::EngineCore", "VLLM::Worker")) -> list[int]:
    """PIDs of every live vLLM engine process (`VLLM::EngineCore`, `VLLM::Worker`).

    vLLM names its processes with `setproctitle`; fault tests use this to find an
    engine to kill and to prove that none outlived its actor.

    Examples:
        ```python
        from prefect_vllm.testing import engine_processes

        assert isinstance(engine_processes(), list)
        ```
    """
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            title = " ".join(proc.info["cmdline"] or []) or (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith(kinds):
            pids.append(proc.info["pid"])
    return pids
