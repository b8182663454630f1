"""Models made offline: the full-size layout writer (the tiny model is tested in test_testing)."""

from __future__ import annotations

from pathlib import Path

from prefect_vllm._models import SHAPES, llama_tensors, write_random_llama


def test_the_llama_3_1_8b_shape_is_the_real_models_layout_to_the_parameter() -> None:
    """Every tensor name and shape of transformers' own Llama-3.1-8B, and its 8,030,261,248 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = SHAPES["llama-3.1-8b"]
    with torch.device("meta"):  # no memory: shapes only
        reference = LlamaForCausalLM(LlamaConfig(**fields))
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    planned = dict(llama_tensors(fields))
    assert planned == expected
    assert sum(torch.Size(s).numel() for s in planned.values()) == 8_030_261_248


def test_a_random_llama_loads_in_transformers_and_every_sampled_id_decodes(tmp_path: Path) -> None:
    """The writer's output, at a small size: complete weights, finite logits, a padded vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    fields = {
        **SHAPES["llama-3.1-8b"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "vocab_size": 3000,
        "max_position_embeddings": 512,
    }
    out = write_random_llama(tmp_path / "model", fields, seed=3)
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 3000
    ids = tokenizer("Tell me about the engine.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 3000 and torch.isfinite(logits).all()
    assert all(isinstance(tokenizer.decode([i]), str) for i in range(0, 3000, 7))
    assert tokenizer.decode([2999]).strip().isalpha(), "a padding token decodes to letters"
    again = write_random_llama(tmp_path / "again", fields, seed=3)
    assert (again / "model-00001-of-00001.safetensors").read_bytes() == (
        out / "model-00001-of-00001.safetensors"
    ).read_bytes()
