"""Batched prompt tokenization in the engine actor gives exactly vLLM's per-row token ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prefect_vllm._engine.protocol import EngineRow
from prefect_vllm._engine.vllm_io import engine_prompt, tokenize_prompts


def test_batched_tokenization_matches_one_call_per_row_and_skips_other_rows(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [
        EngineRow(prompt="Tell me about the model."),
        EngineRow(messages=[{"role": "user", "content": "hi"}]),
        EngineRow(prompt="word " * 200),
        EngineRow(error="sampling_params: bad"),
        EngineRow(prompt=""),
    ]
    ids = tokenize_prompts(rows, tok, max_model_len=64)
    assert ids[0] == tok("Tell me about the model.")["input_ids"]
    assert ids[1] is None and ids[3] is None, "chat rows render their template; error rows never run"
    # Cut one token past the context, as vLLM cuts, so the engine still rejects it as too long.
    assert len(tok("word " * 200)["input_ids"]) > 65 and len(ids[2] or []) == 65
    assert ids[4] == tok("")["input_ids"]
    # Token ids reach the engine already rendered: vLLM's own input, not a raw prompt.
    assert engine_prompt(rows[0], tok, {}, ids[0], 64) == {"type": "token", "prompt_token_ids": ids[0]}
    assert engine_prompt(rows[0], tok, {}, None) == {"prompt": "Tell me about the model."}
    with pytest.raises(ValueError, match=r"maximum context length is 64 tokens.*at least 65 input tokens"):
        engine_prompt(rows[2], tok, {}, ids[2], 64)


def test_a_tokenizer_that_fails_on_the_batch_leaves_every_row_to_vllm() -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise TypeError("no batch")

    assert tokenize_prompts([EngineRow(prompt="a"), EngineRow(prompt="b")], broken, 64) == [None, None]
