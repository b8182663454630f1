"""One row's request into vLLM's terms, and vLLM's output back into one output row.

Runs inside the engine actor. A chat row is rendered with the model's chat template
(or the job's) into token ids here, with the engine's own tokenizer, so the engine
never re-tokenizes rendered text (which would add a second BOS token).
"""

from __future__ import annotations

from typing import Any

from prefect_vllm._columns import (
    CHOICES,
    COMPLETION_TOKENS,
    EMBEDDING,
    EMBEDDINGS,
    ERROR,
    FINISH_REASON,
    LABEL,
    PROBS,
    PROMPT_TOKENS,
    RESULTS,
    SCORE,
    TEXT,
)
from prefect_vllm._engine.protocol import EngineRow
from prefect_vllm._job_tasks import job_task


def tokenize_prompts(rows: list[EngineRow], tokenizer: Any, max_model_len: int) -> list[list[int] | None]:
    """Token ids of every plain-text row, in one batched tokenizer call; None for the others.

    vLLM tokenizes each prompt on its own (a Python call per row); a fast tokenizer
    encodes a whole batch in one call into Rust. Same arguments as vLLM's: special
    tokens added, and cut at one token over the context so that an over-long prompt
    still fails vLLM's own length check as a row error.
    """
    texts = {i: row.prompt for i, row in enumerate(rows) if isinstance(row.prompt, str)}
    ids: list[list[int] | None] = [None] * len(rows)
    if not texts:
        return ids
    try:
        encoded = tokenizer(
            list(texts.values()), add_special_tokens=True, truncation=True, max_length=max_model_len + 1
        )["input_ids"]
    except Exception:
        return ids  # each row then goes through vLLM's own tokenization, and its own error
    for i, row_ids in zip(texts, encoded, strict=True):
        ids[i] = list(row_ids)
    return ids


def engine_prompt(
    row: EngineRow,
    tokenizer: Any,
    template: dict[str, Any],
    token_ids: list[int] | None = None,
    max_model_len: int | None = None,
) -> Any:
    """The engine's input for a row: its token ids (given, tokenized here, or its messages
    rendered with the chat template), else its text.

    Token ids go to the engine as its own `TokensInput`, already rendered: vLLM renders
    (and warns about) only what it gets as raw prompts.

    Args:
        row: The row (`EngineRow`).
        tokenizer: The engine's tokenizer.
        template: `chat_template` (a Jinja string or None for the model's own) and
            `chat_template_kwargs` (extra variables, e.g. `enable_thinking`).
        token_ids: The row's prompt already tokenized (`tokenize_prompts`), if it was.
        max_model_len: The engine's context length: a longer prompt is this row's error.

    Raises:
        ValueError: The prompt is longer than the context, the model has no chat
            template, or rendering failed.
    """
    if token_ids is not None:
        return _tokens_input(token_ids, max_model_len)
    messages = row.messages
    if messages is None:
        prompt = row.prompt
        return _tokens_input(prompt, max_model_len) if isinstance(prompt, list) else {"prompt": prompt}
    try:
        rendered = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=True,
            chat_template=template.get("chat_template"),
            **(template.get("chat_template_kwargs") or {}),
        )
    except Exception as exc:
        raise ValueError(f"chat template: {type(exc).__name__}: {str(exc)[:300]}") from None
    ids = rendered if isinstance(rendered, list) else rendered["input_ids"]
    return _tokens_input(list(ids), max_model_len)


def _tokens_input(token_ids: list[int], max_model_len: int | None) -> Any:
    """vLLM's `TokensInput` for a prompt, after the context-length check its renderer makes."""
    from vllm.inputs import tokens_input

    if max_model_len is not None and len(token_ids) > max_model_len:
        # `tokenize_prompts` cuts at one token over the context: "at least" that many.
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"contains at least {len(token_ids)} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt."
        )
    return tokens_input(token_ids)


def rendered_prompt(engine: Any, prompt: str | list[int], tokenization: dict[str, Any]) -> Any:
    """The engine's input for a text (or token ids) tokenized, cut and checked by vLLM's own
    renderer with `tokenization` (`tokenization_kwargs`, e.g. `truncate_prompt_tokens`), as
    `LLM.embed` and its siblings do; not a raw prompt, which vLLM deprecates.

    Raises:
        ValueError, VLLMValidationError: The prompt is too long (and not cut) or malformed.
    """
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    params = engine.renderer.default_cmpl_tok_params
    if tokenization:
        params = params.with_kwargs(**tokenization)
    (engine_input,) = engine.renderer.render_cmpl([parse_model_prompt(engine.model_config, prompt)], params)
    return engine_input


def lora_request(row: EngineRow, adapters: dict[str, str]) -> Any:
    """vLLM's `LoRARequest` for a row that names an adapter, else None.

    Adapter ids are positions in the sorted names: the same in every actor of a job.
    """
    name = row.adapter
    if name is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, sorted(adapters).index(name) + 1, adapters[name])


def sampling_params(
    row: EngineRow, seed: int | None, job_sampling: dict[str, Any], job_format: dict[str, Any] | None
) -> Any:
    """vLLM `SamplingParams` for a row: the job's, overridden by the row's own.

    A row's own `seed` wins over the one derived from the job seed; a row's own
    `response_format` wins over the job's JSON schema.

    Raises:
        ValueError: vLLM rejects the combination (e.g. `top_p` out of range).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    merged = {**job_sampling, **row.sampling}
    merged.setdefault("seed", seed)
    response_format = row.response_format or job_format
    if response_format:
        if response_format["type"] == "json_schema":
            structured = StructuredOutputsParams(json=response_format["json_schema"]["schema"])
        else:
            structured = StructuredOutputsParams(json_object=True)
        merged["structured_outputs"] = structured
    return SamplingParams(**merged, output_kind=RequestOutputKind.FINAL_ONLY)


def output_row(final: Any, params: Any) -> dict[str, Any]:
    """One output row from vLLM's final `RequestOutput`: the first choice, and all of them.

    Every choice goes to `choices` when the row asked for `n > 1` or logprobs;
    otherwise `choices` is null.

    Args:
        final: The request's final output.
        params: The request's `SamplingParams`.
    """
    wants_choices = params.n > 1 or params.logprobs is not None
    choices = sorted(final.outputs, key=lambda c: c.index)
    first = choices[0]
    return {
        TEXT: first.text,
        FINISH_REASON: first.finish_reason,
        PROMPT_TOKENS: len(final.prompt_token_ids or ()),
        COMPLETION_TOKENS: sum(len(c.token_ids) for c in choices),
        ERROR: None,
        CHOICES: [_choice(c, params.logprobs) for c in choices] if wants_choices else None,
    }


def failed_row(message: str, task: str = "generate") -> dict[str, Any]:
    """An output row of a `task` call that carries only an error."""
    return job_task(task).failed_row(message)


def _refused(error: Any, task: str) -> dict[str, Any]:
    """The row of a request that vLLM's engine answered with an error of its own."""
    return failed_row(f"the engine refused the row: {str(error)[:300]}", task)


def pooling_params(task: str, pooling: dict[str, Any]) -> Any:
    """vLLM `PoolingParams` for a row of an `embed` or `classify` job, with the job's options
    (or the row's own, over the job's).

    Raises:
        ValueError: vLLM rejects them.
    """
    from vllm import PoolingParams

    return PoolingParams(**{"task": task, **pooling})


def class_names(hf_config: Any) -> list[str] | None:
    """The names of a classifier's classes by index (its `id2label`), or None when the
    model names them only by default (`LABEL_0`, ...) or not at all."""
    id2label = getattr(hf_config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names


def classification_row(final: Any, names: list[str] | None) -> dict[str, Any]:
    """One output row from vLLM's final `PoolingRequestOutput` of a classify request:
    every class's probability, and the most likely class's name (else its index)."""
    if getattr(final, "error", None) is not None:
        return _refused(final.error, "classify")
    probs = [float(p) for p in _floats(final.outputs.data)]
    best = max(range(len(probs)), key=probs.__getitem__) if probs else None
    label = None if best is None else (names[best] if names and best < len(names) else str(best))
    return {LABEL: label, PROBS: probs, PROMPT_TOKENS: len(final.prompt_token_ids or ()), ERROR: None}


def embedding_row(finals: list[Any], *, several: bool = False) -> dict[str, Any]:
    """One output row from vLLM's final `PoolingRequestOutput`s of a row's embed requests:
    one for a single input; one per input, in order, for a request of `several`."""
    for final in finals:
        if getattr(final, "error", None) is not None:
            return _refused(final.error, "embed")
    vectors = [_floats(final.outputs.data) for final in finals]
    return {
        EMBEDDING: vectors[0],
        PROMPT_TOKENS: sum(len(final.prompt_token_ids or ()) for final in finals),
        ERROR: None,
        EMBEDDINGS: vectors if several else None,
    }


def can_score(engine: Any, tasks: tuple[Any, ...]) -> bool:
    """Whether vLLM scores text pairs with the engine's model (its scoring API is on for it:
    an embedding model, or a classifier of one label), without building anything."""
    if "generate" in tasks:
        return False
    from vllm.entrypoints.pooling.utils import enable_scoring_api

    try:
        return bool(enable_scoring_api(tasks, engine.model_config))
    except Exception:  # vLLM could not tell the model's pooling task: it cannot score either
        return False


def scorer(engine: Any, tasks: tuple[Any, ...]) -> Any:
    """vLLM's own scoring processor for the engine's model, the one `LLM.score` uses: a
    cross-encoder's (a classifier with one label), or an embedding model's (the cosine
    similarity of the two texts' vectors). None when vLLM cannot score with the model.

    Args:
        engine: The `AsyncLLM`.
        tasks: What the engine serves (`get_supported_tasks`).
    """
    from vllm.entrypoints.pooling.factories import init_pooling_io_processors
    from vllm.renderers.chat_utils import ChatTemplateConfig
    from vllm.tasks import SCORE_TYPE_MAP

    score_type = SCORE_TYPE_MAP.get(engine.model_config.get_pooling_task(tasks))
    if score_type is None:
        return None
    processors = init_pooling_io_processors(
        supported_tasks=tasks,
        vllm_config=engine.vllm_config,
        renderer=engine.renderer,
        chat_template_config=ChatTemplateConfig(chat_template=None),
    )
    return processors.get(score_type)


def score_inputs(processor: Any, text: str, pair: str | list[str], tokenization: dict[str, Any]) -> list[Any]:
    """The engine requests (`PoolingEngineInput`s: prompt and params) that score one text
    pair, or a query against each of several documents (`pair` a list), made as
    `LLM.score` makes them: one per pair for a cross-encoder, one per text for an
    embedding model. `tokenization` is `LLM.score`'s `tokenization_kwargs`
    (`truncate_prompt_tokens`).

    Raises:
        ValueError: vLLM refuses the pair (e.g. longer than the context).
    """
    from vllm import PoolingParams
    from vllm.entrypoints.pooling.typing import OfflineScoringInputsContext

    context = OfflineScoringInputsContext(
        pooling_task=processor.pooling_task,
        tokenization_kwargs=tokenization or None,
        lora_request=None,
        priorities=None,
        scoring_data=processor.valid_inputs(text, pair),
        chat_template=None,
        pooling_params=PoolingParams(task=processor.pooling_task),
    )
    factory, _count = processor.get_request_factory_offline(context)
    return [processor.render(params) for params in factory()]


def _scored(processor: Any, finals: list[Any]) -> list[Any]:
    """The scored outputs of a row's requests (`score_inputs`), one per pair, as
    `LLM.score` scores them."""
    from vllm.entrypoints.pooling.typing import OfflineOutputsContext

    return list(processor.post_process_offline(OfflineOutputsContext(outputs=finals, n_queries=1)))


def score_row(processor: Any, finals: list[Any]) -> dict[str, Any]:
    """One output row from the final outputs of a pair's requests (`score_inputs`)."""
    from vllm.outputs import ScoringRequestOutput

    (scored,) = _scored(processor, finals)
    if getattr(scored, "error", None) is not None:
        return _refused(scored.error, "score")
    return {
        SCORE: ScoringRequestOutput.from_base(scored).outputs.score,
        PROMPT_TOKENS: len(scored.prompt_token_ids or ()),
        ERROR: None,
    }


def rerank_row(processor: Any, finals: list[Any], documents: list[str], top_n: int | None) -> dict[str, Any]:
    """One output row of a rerank job from the final outputs of a query's requests
    (`score_inputs` with its documents), as vLLM's `/v1/rerank` answers: every document's
    index, relevance score and text, best first, the first `top_n` of them (None: all).
    `prompt_tokens` counts every request's prompt, as vLLM's usage does."""
    from vllm.outputs import ScoringRequestOutput

    scored = _scored(processor, finals)
    for one in scored:
        if getattr(one, "error", None) is not None:
            return _refused(one.error, "rerank")
    scores = [float(ScoringRequestOutput.from_base(one).outputs.score) for one in scored]
    best = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable: ties keep their order
    results = [{"index": i, "relevance_score": scores[i], "document": documents[i]} for i in best]
    return {
        RESULTS: results[:top_n] if top_n else results,
        PROMPT_TOKENS: sum(len(one.prompt_token_ids or ()) for one in scored),
        ERROR: None,
    }


def _floats(data: Any) -> list[float]:
    return data.tolist() if hasattr(data, "tolist") else list(data)


def _choice(completion: Any, top_k: int | None) -> dict[str, Any]:
    logprobs = None
    if completion.logprobs is not None:
        logprobs = [
            _token_logprobs(token_id, candidates, top_k or 0)
            for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=False)
        ]
    return {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "completion_tokens": len(completion.token_ids),
        "logprobs": logprobs,
    }


def _token_logprobs(token_id: int, candidates: dict[int, Any], top_k: int) -> dict[str, Any]:
    """The sampled token's logprob and the `top_k` best candidates, best first.

    vLLM adds the sampled token to the candidates even when it ranks below the top
    k: it is left out of `top_logprobs` then, as OpenAI does.
    """
    sampled = candidates.get(token_id)
    top = sorted(
        (lp for lp in candidates.values() if lp.rank is not None and lp.rank <= top_k), key=lambda lp: lp.rank
    )
    return {
        "token": sampled.decoded_token if sampled is not None else None,
        "logprob": sampled.logprob if sampled is not None else None,
        "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob} for lp in top],
    }
