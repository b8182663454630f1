"""Reserved column names, in one place: what input rows may hold, what output rows hold.

Which columns a job of each task reads and writes is its entry in the task table
(`prefect_vllm._job_tasks`); the Arrow schemas are in `prefect_vllm._output.schema`.
"""

from __future__ import annotations

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
#: A rerank job's output: each document's index, relevance score and text, best first.
RESULTS = "results"

#: A scoring job's default column of each pair's second text (`InputColumns.pair`).
PAIR_COLUMN = "text_pair"

#: A rerank job's default input columns: the query, its documents (a list of texts), and
#: how many of the best to keep (optional; 0 or none: all of them).
QUERY = "query"
DOCUMENTS = "documents"
TOP_N = "top_n"

#: Optional input columns: chat messages, per-row sampling overrides, a LoRA adapter's name.
MESSAGES = "messages"
SAMPLING_PARAMS = "sampling_params"
MODEL = "model"
