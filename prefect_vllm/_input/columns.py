"""Reserved column names and the output schema, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

CUSTOM_ID = "custom_id"
PROMPT = "prompt"
TEXT = "text"
FINISH_REASON = "finish_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
ERROR = "error"
KIND = "kind"
CHOICES = "choices"
EMBEDDING = "embedding"
EMBEDDINGS = "embeddings"
ENCODING_FORMAT = "encoding_format"
PROBS = "probs"
LABEL = "label"
SCORE = "score"

#: A scoring job's default column of each pair's second text (`InputColumns.pair`).
PAIR_COLUMN = "text_pair"

#: What a job does with each row: generate text, embed it, classify it, or score a pair of
#: texts (the last three with vLLM's pooling runner).
TASKS = ("generate", "embed", "classify", "score")
POOLING_TASKS = ("embed", "classify", "score")

#: Optional input columns: chat messages, per-row sampling overrides, a LoRA adapter's name.
MESSAGES = "messages"
SAMPLING_PARAMS = "sampling_params"
MODEL = "model"

#: Output columns, in order (DESIGN.md section 3.2). `kind` is `chat` or `completion`;
#: `choices` holds every choice (with logprobs when asked for) for rows that asked for
#: `n > 1` or logprobs, and is null otherwise: `text` is always the first choice.
OUTPUT_COLUMNS = (CUSTOM_ID, TEXT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS, ERROR, KIND, CHOICES)

#: The per-row columns an engine call returns, in order.
ROW_COLUMNS = (TEXT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS, ERROR, CHOICES)

#: An embedding job's output columns, in order, and the per-row columns of its engine calls.
#: `embedding` is the row's vector (the first input's, for an OpenAI `/v1/embeddings`
#: request of several inputs); `embeddings` holds every input's vector for such a
#: request and is null otherwise, and `prompt_tokens` counts all its inputs' tokens.
#: `encoding_format` is `base64` when such a request asked for it (for the OpenAI export).
EMBED_OUTPUT_COLUMNS = (CUSTOM_ID, EMBEDDING, PROMPT_TOKENS, ERROR, EMBEDDINGS, ENCODING_FORMAT)
EMBED_ROW_COLUMNS = (EMBEDDING, PROMPT_TOKENS, ERROR, EMBEDDINGS)

#: A classification job's output columns, in order, and the per-row columns of its engine
#: calls: every class's probability, and the most likely class's name (its index when
#: the model names none).
CLASSIFY_OUTPUT_COLUMNS = (CUSTOM_ID, LABEL, PROBS, PROMPT_TOKENS, ERROR)
CLASSIFY_ROW_COLUMNS = (LABEL, PROBS, PROMPT_TOKENS, ERROR)


#: A scoring job's output columns, in order, and the per-row columns of its engine calls:
#: the relevance of the row's text pair (a cross-encoder's score, or the cosine
#: similarity of an embedding model's two vectors, as vLLM's `LLM.score` gives it).
SCORE_OUTPUT_COLUMNS = (CUSTOM_ID, SCORE, PROMPT_TOKENS, ERROR)
SCORE_ROW_COLUMNS = (SCORE, PROMPT_TOKENS, ERROR)


def row_columns(task: str) -> tuple[str, ...]:
    """The per-row columns an engine call of `task` returns, in order."""
    by_task = {"embed": EMBED_ROW_COLUMNS, "classify": CLASSIFY_ROW_COLUMNS, "score": SCORE_ROW_COLUMNS}
    return by_task.get(task, ROW_COLUMNS)


def output_columns(task: str) -> tuple[str, ...]:
    """The columns of a `task` job's part files, in order."""
    by_task = {
        "embed": EMBED_OUTPUT_COLUMNS,
        "classify": CLASSIFY_OUTPUT_COLUMNS,
        "score": SCORE_OUTPUT_COLUMNS,
    }
    return by_task.get(task, OUTPUT_COLUMNS)


#: Prefix of metadata files in the output folder; part files never start with it.
METADATA_PREFIX = "_"


def output_schema(task: str = "generate") -> pa.Schema:
    """The Arrow schema of every `part-<shard>.parquet` file of a `task` job."""
    import pyarrow as pa

    if task == "classify":
        return pa.schema(
            [
                pa.field(CUSTOM_ID, pa.string(), nullable=False),
                pa.field(LABEL, pa.string()),
                pa.field(PROBS, pa.list_(pa.float32())),
                pa.field(PROMPT_TOKENS, pa.int32()),
                pa.field(ERROR, pa.string()),
            ]
        )
    if task == "score":
        return pa.schema(
            [
                pa.field(CUSTOM_ID, pa.string(), nullable=False),
                pa.field(SCORE, pa.float64()),
                pa.field(PROMPT_TOKENS, pa.int32()),
                pa.field(ERROR, pa.string()),
            ]
        )
    if task == "embed":
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
