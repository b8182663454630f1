"""The prompt markers that make `PoisonLogitsProcessor` kill or crash its engine.

Light (no vLLM, no torch): `prefect_vllm.testing` re-exports them for users, and the
processor (`poison.py`, loaded inside the engine) reads them from here.
"""

from __future__ import annotations

__all__ = ["POISON_MARKER", "POISON_RAISE_MARKER"]

#: A prompt containing this kills the engine (SIGKILL) when `POISON_ENGINE_ARGS` are in use.
POISON_MARKER = "POISONPILL"

#: A prompt containing this makes the engine raise a `RuntimeError` (a crash with a Python
#: error) when `POISON_ENGINE_ARGS` are in use.
POISON_RAISE_MARKER = "POISONRAISE"
