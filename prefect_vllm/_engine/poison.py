"""A vLLM logits processor that kills its engine on marked prompts: a real poison row.

A prompt holding `POISON_MARKER` SIGKILLs the engine process; one holding
`POISON_RAISE_MARKER` makes it raise, so the engine dies of a Python error.

Loaded by vLLM inside the engine process when named in the `logits_processors`
engine argument (`prefect_vllm.testing:PoisonLogitsProcessor`); it is reached
through `prefect_vllm.testing` so users rehearsing failures need no private name.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from prefect_vllm._engine.markers import POISON_MARKER, POISON_RAISE_MARKER

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("prefect_vllm.poison")

#: Environment variable that overrides the marker in the engine process.
POISON_MARKER_ENV = "PREFECT_VLLM_POISON_MARKER"


class PoisonLogitsProcessor(LogitsProcessor):
    """Kills the engine process as soon as a marked prompt joins the batch.

    The crash happens inside vLLM, the way a kernel fault or an out-of-memory kill
    (`POISON_MARKER`: SIGKILL) or a bug in a model's code (`POISON_RAISE_MARKER`: a
    `RuntimeError` raised in the engine's step) on a pathological row would: the
    actor sees `EngineDeadError`, never an exception from our own code.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        model_config = vllm_config.model_config
        self._tokenizer: Any = AutoTokenizer.from_pretrained(
            model_config.tokenizer, revision=model_config.tokenizer_revision
        )
        self._marker = os.environ.get(POISON_MARKER_ENV, POISON_MARKER)

    def is_argmax_invariant(self) -> bool:
        """It never changes logits, so greedy sampling may skip `apply`."""
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Look at each prompt joining the batch; die on a marked one."""
        if batch_update is None:
            return
        for _index, _params, prompt_token_ids, _output in batch_update.added:
            text = self._tokenizer.decode(prompt_token_ids) if prompt_token_ids else ""
            if self._marker in text:
                logger.error("poison prompt scheduled: killing engine process %d", os.getpid())
                os.kill(os.getpid(), signal.SIGKILL)
            if POISON_RAISE_MARKER in text:
                raise RuntimeError(f"poison row: {POISON_RAISE_MARKER} reached the engine")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits pass through unchanged."""
        return logits
