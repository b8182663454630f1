"""LoRA adapters from a folder: found and checked before any engine starts.

vLLM loads an adapter inside the engine process when a request first names it, and
a missing or unreadable adapter there kills the engine: every adapter is checked
here instead, and a row naming an unknown one is a row error before it is sent.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect_vllm.exceptions import ConfigurationError, InputError

__all__ = ["find_adapters", "lora_engine_args"]

#: LoRA ranks vLLM accepts for `max_lora_rank`.
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def find_adapters(lora_dir: str) -> dict[str, tuple[str, int]]:
    """Every adapter in `lora_dir`: subfolder name -> (absolute path, rank).

    Raises:
        ConfigurationError: The folder does not exist or holds no adapter.
        InputError: An adapter's `adapter_config.json` is unreadable or has no rank.
    """
    root = os.path.abspath(os.path.expanduser(lora_dir))
    if not os.path.isdir(root):
        raise ConfigurationError(f"lora_dir: {lora_dir!r} is not a folder")
    adapters: dict[str, tuple[str, int]] = {}
    for name in sorted(os.listdir(root)):
        config = os.path.join(root, name, "adapter_config.json")
        if name.startswith((".", "_")) or not os.path.isfile(config):
            continue
        try:
            with open(config, encoding="utf-8") as f:
                rank = json.load(f).get("r")
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg})", path=config, line=exc.lineno) from None
        except (OSError, AttributeError) as exc:
            raise InputError(f"not a readable adapter config ({exc})", path=config) from None
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise InputError(f"needs a positive integer rank, got {rank!r}", path=config, column="r")
        adapters[name] = (os.path.join(root, name), rank)
    if not adapters:
        raise ConfigurationError(
            f"lora_dir: {lora_dir!r} holds no adapter (subfolders with adapter_config.json)"
        )
    return adapters


def lora_engine_args(adapters: dict[str, tuple[str, int]], engine_args: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments that serve the adapters; the user's own LoRA settings win."""
    rank = max(r for _path, r in adapters.values())
    fitting = next((r for r in _VLLM_RANKS if r >= rank), None)
    if fitting is None:
        raise ConfigurationError(f"lora_dir: rank {rank} is above vLLM's largest ({_VLLM_RANKS[-1]})")
    return {
        "enable_lora": True,
        "max_lora_rank": fitting,
        # One slot more than adapters: measured on vLLM 0.32 for CPU, rows without an
        # adapter were generated with the adapter in the last slot whenever every slot
        # was taken (with max_loras=1, every base row got the one adapter).
        "max_loras": len(adapters) + 1,
        **engine_args,
    }
