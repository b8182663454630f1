"""The tiny model is made offline and is the same for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

from prefect_vllm.testing import make_tiny_model


def test_same_seed_gives_identical_files_and_a_usable_tokenizer(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", seed=1)
    b = make_tiny_model(tmp_path / "b", seed=1)
    c = make_tiny_model(tmp_path / "c", seed=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64, "CPU attention needs head_dim 64"
    assert config["dtype"] == "float32"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    assert tok.decode(tok("Tell me about the model.")["input_ids"]) == "Tell me about the model."
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
