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

#: Output columns, in order (DESIGN.md section 3.2).
OUTPUT_COLUMNS = (CUSTOM_ID, TEXT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS, ERROR)

#: Prefix of metadata files in the output folder; part files never start with it.
METADATA_PREFIX = "_"


def output_schema() -> pa.Schema:
    """The Arrow schema of every `part-<shard>.parquet` file."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(CUSTOM_ID, pa.string(), nullable=False),
            pa.field(TEXT, pa.string()),
            pa.field(FINISH_REASON, pa.string()),
            pa.field(PROMPT_TOKENS, pa.int32()),
            pa.field(COMPLETION_TOKENS, pa.int32()),
            pa.field(ERROR, pa.string()),
        ]
    )
