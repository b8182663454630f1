"""The Arrow schema of each task's part files (DESIGN.md section 3.2).

Each task's entry in `prefect_vllm._job_tasks` names its schema here; pyarrow is
imported when a schema is built, not with the module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_vllm._columns import (
    CHOICES,
    COMPLETION_TOKENS,
    CUSTOM_ID,
    EMBEDDING,
    EMBEDDINGS,
    ENCODING_FORMAT,
    ERROR,
    FINISH_REASON,
    KIND,
    LABEL,
    PROBS,
    PROMPT_TOKENS,
    RESULTS,
    SCORE,
    TEXT,
)

if TYPE_CHECKING:
    import pyarrow as pa


def generation_schema() -> pa.Schema:
    """Generated text: the first choice's columns, and every choice when a row asked for
    `n > 1` or logprobs (`choices`, null otherwise)."""
    import pyarrow as pa

    top = pa.struct([pa.field("token", pa.string()), pa.field("logprob", pa.float64())])
    logprob = pa.struct(
        [
            pa.field("token", pa.string()),
            pa.field("logprob", pa.float64()),
            pa.field("top_logprobs", pa.list_(top)),
        ]
    )
    choice = pa.struct(
        [
            pa.field("text", pa.string()),
            pa.field("finish_reason", pa.string()),
            pa.field("completion_tokens", pa.int32()),
            pa.field("logprobs", pa.list_(logprob)),
        ]
    )
    return pa.schema(
        [
            pa.field(CUSTOM_ID, pa.string(), nullable=False),
            pa.field(TEXT, pa.string()),
            pa.field(FINISH_REASON, pa.string()),
            pa.field(PROMPT_TOKENS, pa.int32()),
            pa.field(COMPLETION_TOKENS, pa.int32()),
            pa.field(ERROR, pa.string()),
            pa.field(KIND, pa.string()),
            pa.field(CHOICES, pa.list_(choice)),
        ]
    )


def embedding_schema() -> pa.Schema:
    """A vector per row, and every input's vector for a request of several inputs."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(CUSTOM_ID, pa.string(), nullable=False),
            pa.field(EMBEDDING, pa.list_(pa.float32())),
            pa.field(PROMPT_TOKENS, pa.int32()),
            pa.field(ERROR, pa.string()),
            pa.field(EMBEDDINGS, pa.list_(pa.list_(pa.float32()))),
            pa.field(ENCODING_FORMAT, pa.string()),
        ]
    )


def classification_schema() -> pa.Schema:
    """Every class's probability, and the most likely class's name."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(CUSTOM_ID, pa.string(), nullable=False),
            pa.field(LABEL, pa.string()),
            pa.field(PROBS, pa.list_(pa.float32())),
            pa.field(PROMPT_TOKENS, pa.int32()),
            pa.field(ERROR, pa.string()),
        ]
    )


def score_schema() -> pa.Schema:
    """The relevance of each row's text pair."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(CUSTOM_ID, pa.string(), nullable=False),
            pa.field(SCORE, pa.float64()),
            pa.field(PROMPT_TOKENS, pa.int32()),
            pa.field(ERROR, pa.string()),
        ]
    )


def rerank_schema() -> pa.Schema:
    """A query's documents best first (each one's index in the row, its relevance score
    and its text), cut to the row's `top_n`, as vLLM's `/v1/rerank` answers."""
    import pyarrow as pa

    result = pa.struct(
        [
            pa.field("index", pa.int32()),
            pa.field("relevance_score", pa.float64()),
            pa.field("document", pa.string()),
        ]
    )
    return pa.schema(
        [
            pa.field(CUSTOM_ID, pa.string(), nullable=False),
            pa.field(RESULTS, pa.list_(result)),
            pa.field(PROMPT_TOKENS, pa.int32()),
            pa.field(ERROR, pa.string()),
        ]
    )
