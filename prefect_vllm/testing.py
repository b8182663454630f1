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

if TYPE_CHECKING:
    from prefect_vllm._engine.poison import PoisonLogitsProcessor

__all__ = [
    "CHAT_TEMPLATE",
    "POISON_ENGINE_ARGS",
    "POISON_MARKER",
    "PoisonLogitsProcessor",
    "engine_processes",
    "make_tiny_lora",
    "make_tiny_model",
    "write_sample_batch",
    "write_sample_prompts",
]

#: A prompt containing this kills the engine when `POISON_ENGINE_ARGS` are in use.
POISON_MARKER = "POISONPILL"

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


#: A minimal chat template in the ChatML style, stored in the tokenizer config.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

_CORPUS_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "or",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "it",
    "this",
    "that",
    "these",
    "those",
    "model",
    "prompt",
    "token",
    "batch",
    "shard",
    "engine",
    "actor",
    "ray",
    "prefect",
    "flow",
    "task",
    "run",
    "job",
    "checkpoint",
    "resume",
    "crash",
    "restart",
    "output",
    "input",
    "row",
    "column",
    "file",
    "folder",
    "data",
    "write",
    "read",
    "generate",
    "text",
    "answer",
    "question",
    "summary",
    "translate",
    "explain",
    "list",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hundred",
    "thousand",
    "million",
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "river",
    "mountain",
    "city",
    "road",
    "house",
    "book",
    "story",
    "song",
    "red",
    "green",
    "blue",
    "black",
    "white",
    "small",
    "large",
    "fast",
    "slow",
    "good",
    "bad",
    "new",
    "old",
    "first",
    "last",
    "what",
    "why",
    "how",
    "when",
    "where",
    "who",
    "which",
    "please",
    "tell",
    "me",
    "about",
    "give",
    "describe",
    "user",
    "assistant",
    "system",
    "hello",
    "world",
    "yes",
    "no",
    "maybe",
    "always",
    "never",
    "sometimes",
]


def _corpus(seed: int) -> list[str]:
    """A deterministic corpus of pseudo-sentences to train the tokenizer on."""
    import random

    rng = random.Random(seed)
    sentences = []
    for _ in range(4000):
        words = [rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(4, 16))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    sentences.extend(_CORPUS_WORDS)
    sentences.append("0123456789 ,;:'\"()[]{}<>-_=+*/\\|@#$%^&~`")
    return sentences


def make_tiny_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 1024,
    dtype: str = "float32",
) -> Path:
    """Write a tiny random Llama model with a real BPE tokenizer, offline.

    The result loads in vLLM on CPU and in `transformers`. The same seed gives
    the same tokenizer and weights. The head dimension is
    `hidden_size // num_heads` and must be 64 or more for vLLM's CPU attention
    kernels, hence the defaults.

    Args:
        path: Folder to write the model into; created if missing.
        seed: Seed for the tokenizer corpus and the weights.
        vocab_size: Target BPE vocabulary size.
        hidden_size: Hidden size of the model.
        num_layers: Number of decoder layers.
        num_heads: Number of attention heads.
        max_position_embeddings: Longest context the model accepts, in tokens.
        dtype: `torch_dtype` recorded in the config. Keep float32 on CPUs:
            bf16 engines die with SIGILL on machines where AMX was not enabled.

    Returns:
        The model folder.

    Examples:
        ```python
        from prefect_vllm.testing import make_tiny_model

        model_dir = make_tiny_model("/tmp/tiny-llama", seed=0)
        assert (model_dir / "config.json").exists()
        ```
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
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
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
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
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))  # type: ignore[no-untyped-call]
    model.save_pretrained(out, safe_serialization=True)
    return out


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


def _sample_prompts(n: int, seed: int) -> Iterator[str]:
    """`n` short prompts of random corpus words, the same for the same seed."""
    import random

    rng = random.Random(seed)
    for _ in range(n):
        words = " ".join(rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(3, 12)))
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
