"""Models made offline: a tiny random Llama for demos and tests, the same at full size.

- `make_tiny_model`: a two-layer Llama with a real BPE tokenizer (trained on a built-in
  corpus) and a chat template; loads in vLLM on CPU in seconds.
- `make_tiny_model(..., shape="llama-3.1-8b")`: random weights in Llama-3.1-8B's exact
  layout (32 layers, 4096 hidden, 8 key/value heads, a 128,256-token vocabulary, bf16),
  written tensor by tensor, for GPU benchmarks on machines without hub access.
- `make_tiny_lora`: a random LoRA adapter for the tiny model.

Nothing is downloaded; the same seed writes the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect_vllm._corpus import corpus

__all__ = [
    "CHAT_TEMPLATE",
    "SHAPES",
    "llama_tensors",
    "make_tiny_lora",
    "make_tiny_model",
    "write_random_llama",
]

#: A minimal chat template in the ChatML style, stored in the tokenizer config.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

#: Full-size layouts `make_tiny_model(shape=...)` writes with random weights: the
#: `LlamaConfig` fields of the real model (its vocabulary size included).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
}

#: The largest safetensors file written for a full-size model (the hub's usual size).
_SHARD_BYTES = 5 << 30


def make_tiny_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int | None = None,
    num_heads: int = 2,
    max_position_embeddings: int = 1024,
    dtype: str = "float32",
    shape: str = "tiny",
    classes: list[str] | None = None,
) -> Path:
    """Write a random Llama model with a real BPE tokenizer, offline.

    The tiny shape (the default) loads in vLLM on CPU and in `transformers` in
    seconds. Its head dimension is `hidden_size // num_heads` and must be 64 or more
    for vLLM's CPU attention kernels, hence the defaults. A full-size shape
    (`SHAPES`, e.g. `llama-3.1-8b`) writes random weights in that model's exact layout
    and dtype, one tensor at a time, with the same tokenizer padded to the model's
    vocabulary: an 8B-sized engine for GPU benchmarks, in minutes, with no download.
    The same seed gives the same tokenizer and weights.

    Args:
        path: Folder to write the model into; created if missing.
        seed: Seed for the tokenizer corpus and the weights.
        vocab_size: Target BPE vocabulary size (tiny shape).
        hidden_size: Hidden size of the model (tiny shape).
        num_layers: Number of decoder layers. Default: 2 (tiny), the model's own (full size).
        num_heads: Number of attention heads (tiny shape).
        max_position_embeddings: Longest context the model accepts, in tokens (tiny shape).
        dtype: `torch_dtype` of the tiny shape. Keep float32 on CPUs: bf16 engines die
            with SIGILL on machines where AMX was not enabled.
        shape: `tiny`, or a full-size layout named in `SHAPES`.
        classes: Class names: a tiny classifier (`LlamaForSequenceClassification`, a
            random score head over them, named in `id2label`) instead of a language
            model, for `--task classify`. One name makes a classifier of one label:
            a cross-encoder, which vLLM scores text pairs with (`--task score`).

    Returns:
        The model folder.

    Raises:
        ValueError: An unknown shape.

    Examples:
        ```python
        from prefect_vllm.testing import make_tiny_model

        model_dir = make_tiny_model("/tmp/tiny-llama", seed=0)
        assert (model_dir / "config.json").exists()
        ```
    """
    out = Path(path)
    if shape != "tiny":
        if shape not in SHAPES:
            raise ValueError(f"unknown model shape {shape!r}: choose tiny or one of {sorted(SHAPES)}")
        fields = dict(SHAPES[shape])
        if num_layers is not None:
            fields["num_hidden_layers"] = num_layers
        return write_random_llama(out, fields, seed=seed)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    if classes is not None and (not classes or len(set(classes)) != len(classes)):
        raise ValueError(f"a classifier needs distinct class names, got {classes}")
    fast = _tokenizer(out, seed, vocab_size, max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2 if num_layers is None else num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    if classes is not None:
        config.num_labels = len(classes)
        config.id2label = dict(enumerate(classes))
        config.label2id = {name: i for i, name in enumerate(classes)}
        model = LlamaForSequenceClassification(config).to(getattr(torch, dtype))  # type: ignore[no-untyped-call]
    else:
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))  # type: ignore[no-untyped-call]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # "Writing model shards" bar
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    return out


def _tokenizer(out: Path, seed: int, vocab_size: int, max_length: int, pad_to: int | None = None) -> Any:
    """Train the BPE tokenizer on the built-in corpus and save it into `out`.

    With `pad_to`, the vocabulary is filled up to that size with tokens that no text
    ever encodes to (a full-size model's embedding rows), each decoding to letters,
    so whatever id a random model samples still decodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed), trainer=trainer)
    if pad_to is not None:
        tokenizer = _padded(tokenizer, pad_to)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _padded(tokenizer: Any, size: int) -> Any:
    """The tokenizer with its BPE vocabulary filled up to `size` unreachable tokens."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > size:
        raise ValueError(f"cannot pad a vocabulary of {len(vocab)} tokens to {size}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    for token_id in range(len(vocab), size):
        word, n = "", token_id
        while True:  # the id in base 26: unique, and made of characters any text may hold
            word, n = letters[n % 26] + word, n // 26
            if not n:
                break
        vocab["\u0120\u0120" + word] = token_id  # two byte-level spaces: no corpus text merges to it
    return Tokenizer.from_str(json.dumps(spec))


def llama_tensors(fields: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of a `LlamaForCausalLM` with these config fields: name and shape, in order."""
    hidden, inter = fields["hidden_size"], fields["intermediate_size"]
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    head_dim = fields.get("head_dim") or hidden // heads
    vocab = fields["vocab_size"]
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(fields["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        tensors += [
            (f"{layer}.input_layernorm.weight", (hidden,)),
            (f"{layer}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (f"{layer}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{layer}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{layer}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (f"{layer}.post_attention_layernorm.weight", (hidden,)),
            (f"{layer}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{layer}.mlp.up_proj.weight", (inter, hidden)),
            (f"{layer}.mlp.down_proj.weight", (hidden, inter)),
        ]
    tensors.append(("model.norm.weight", (hidden,)))
    if not fields.get("tie_word_embeddings", False):
        tensors.append(("lm_head.weight", (vocab, hidden)))
    return tensors


def write_random_llama(out: Path, fields: dict[str, Any], *, seed: int = 0) -> Path:
    """Write a Llama of any size with random weights, tensor by tensor, and the tiny tokenizer
    padded to its vocabulary.

    Weights are normal with std 0.02 (output projections scaled down by the depth, so
    activations stay finite through every layer), norms are ones. Files of at most
    5 GiB, with the hub's index, so vLLM loads them as it loads a downloaded model.

    Args:
        out: The model folder.
        fields: `LlamaConfig` fields (`SHAPES[...]`, or smaller for a quick check).
        seed: Seed for the tokenizer corpus and the weights.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    fast = _tokenizer(out, seed, 512, fields["max_position_embeddings"], pad_to=fields["vocab_size"])
    config = LlamaConfig(
        **fields,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    config.save_pretrained(out)
    dtype = getattr(torch, fields.get("dtype", "bfloat16"))
    item = torch.empty((), dtype=dtype).element_size()
    tensors = llama_tensors(fields)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = item * _numel(shape)
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / (2 * fields["num_hidden_layers"]) ** 0.5
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        weights = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                weights[name] = torch.ones(shape, dtype=dtype)
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                weights[name] = torch.empty(shape).normal_(0.0, std, generator=generator).to(dtype)
            weight_map[name] = filename
        save_file(weights, str(out / filename), metadata={"format": "pt"})
        del weights
    index_file = {
        "metadata": {"total_size": sum(item * _numel(shape) for _, shape in tensors)},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def make_tiny_lora(
    path: str | os.PathLike[str], base_model: str | os.PathLike[str], *, rank: int = 8, seed: int = 0
) -> Path:
    """Write a random LoRA adapter (PEFT layout) for a model made by `make_tiny_model`.

    The adapter changes `q_proj` and `v_proj` of every layer with large random weights,
    so greedy outputs with and without it differ. Made offline, in a second.

    Examples:
        ```python
        from prefect_vllm.testing import make_tiny_lora, make_tiny_model

        base = make_tiny_model("/tmp/tiny-llama")
        adapter = make_tiny_lora("/tmp/adapters/pirate", base)
        assert (adapter / "adapter_config.json").exists()
        ```
    """
    import torch
    from safetensors.torch import save_file

    with open(Path(base_model) / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    outs = {
        "q_proj": config["num_attention_heads"] * head_dim,
        "v_proj": config["num_key_value_heads"] * head_dim,
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out_features in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(outs),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
