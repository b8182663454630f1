"""The table of job tasks: what a job does with each row, one frozen entry per task.

Everything that varies by the job's task is its entry's: the vLLM runner and task its
engines need, the columns it reads and writes and their Arrow schema, how much engine
work a row may take (its call deadline), the options that apply to it (and the refusal
of each one that does not), what its fingerprint holds, the actor's way of serving a
row, its OpenAI Batch endpoints and response line. The command's `--task` choices, the
flow's `task` parameter, the shard reader and writer, the job identity and the engine
actor ask the entry; none of them switches on a task's name.

Pure and light (no vLLM, Ray or Prefect; pyarrow only when a schema is built): the
command reads it before anything starts, the actor in every engine process.

Examples:
    ```python
    from prefect_vllm._job_tasks import job_task

    rerank = job_task("rerank")
    assert rerank.runner == "pooling" and rerank.serves == "score"
    assert rerank.refusal("export") is None
    assert job_task("classify").refusal("export", "--export").startswith("--export: ")
    ```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prefect_vllm._columns import (
    CHOICES,
    COMPLETION_TOKENS,
    CUSTOM_ID,
    DOCUMENTS,
    EMBEDDING,
    EMBEDDINGS,
    ENCODING_FORMAT,
    ERROR,
    FINISH_REASON,
    KIND,
    LABEL,
    PAIR_COLUMN,
    PROBS,
    PROMPT,
    PROMPT_TOKENS,
    QUERY,
    RESULTS,
    SCORE,
    TEXT,
    TOP_N,
)
from prefect_vllm._input.requests import RowRequest, with_documents, with_pair
from prefect_vllm._output import schema
from prefect_vllm._output.openai import ResponseLine, embedding_line, output_line, rerank_line

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["JOB_TASKS", "OPTIONS", "JobTask", "TaskName", "job_task"]

#: The tasks by name, for the flow's `task` parameter (Prefect builds its form from it).
TaskName = Literal["generate", "embed", "classify", "score", "rerank"]

#: The options that apply to some tasks only, and how a job of another task refuses one:
#: `{where}` is the parameter or flag as the caller names it, `{job}` the job ("a scoring
#: job"), `{task}` its task, `{having}` the jobs the option is for (`{has}`: has or have).
OPTIONS: dict[str, str] = {
    "export": (
        "{where}: the OpenAI Batch API has completion and embedding endpoints (vLLM's run-batch "
        "also rerank); {job}'s output is its part files"
    ),
    "requests": "{where}: LoRA adapters and JSON schemas are for generation, not {task} ({job})",
    "truncate_prompt_tokens": (
        "{where}: only {having} cut their prompts; {job}'s over-long prompt is a row error"
    ),
    "pair_column": "{where}: only {having} {has} it",
    "embed": "{where}: only {having} {has} it",
}


def _pair_of(row: RowRequest, value: Any, column: str, _extra: Mapping[str, Any]) -> RowRequest:
    return with_pair(row, value, column)


def _documents_of(row: RowRequest, value: Any, column: str, extra: Mapping[str, Any]) -> RowRequest:
    return with_documents(row, value, column, extra.get(TOP_N))


#: A task's row builder: a row read as text (or failed already) with its second column's
#: value (`pair_column`), that column's name and the task's extra columns' values.
RowBuilder = Callable[[RowRequest, Any, str, Mapping[str, Any]], RowRequest]


@dataclass(frozen=True)
class JobTask:
    """One task's entry: everything about a job that depends on what it does with a row.

    Attributes:
        name: `--task` and the flow's `task`.
        job: The job in messages ("an embedding job").
        runner: vLLM's runner its engines are started with.
        serves: What its engines must serve (vLLM's task names; `score` when vLLM
            scores with the model).
        call: How the engine actor serves a row: `generate`, `pool` (`AsyncLLM.encode`
            with the task's pooling params), `score` (a pair, through vLLM's scoring
            processor) or `rerank` (a query against each of its documents, likewise).
        row_columns: The per-row columns an engine call returns, in order.
        output_columns: The columns of its part files, in order (`schema`'s names).
        schema: Builds the Arrow schema of its part files.
        options: The options of `OPTIONS` that apply to it.
        text_column: The default column of each row's (first) text.
        pair_column: The default column of each row's second value (a scoring job's
            second text, a rerank job's documents); None when it reads none.
        build_row: Adds the second column's value (and `extra_columns`') to a row.
        extra_columns: Optional input columns it also reads (a rerank row's `top_n`).
        row_extras: Output columns taken from the row request, by its attribute.
        endpoints: OpenAI Batch urls whose requests make a job of this task.
        response_line: Its `output.jsonl` line writer; None: it has no OpenAI export.
        samples: Its engines sample: the job's sampling settings are in its fingerprint,
            and a row's budget is its `max_tokens` times `n`.
        requests_per_item: Engine requests per item of a row (an input of an embeddings
            request, a document to rerank), for a row's budget.
        fits_hint: What to run instead when a model's engines cannot serve it.
    """

    name: str
    job: str
    runner: Literal["generate", "pooling"]
    serves: str
    call: Literal["generate", "pool", "score", "rerank"]
    row_columns: tuple[str, ...]
    output_columns: tuple[str, ...]
    schema: Callable[[], pa.Schema]
    options: frozenset[str]
    text_column: str = PROMPT
    pair_column: str | None = None
    build_row: RowBuilder | None = None
    extra_columns: tuple[str, ...] = ()
    row_extras: Mapping[str, str] = field(default_factory=dict)
    endpoints: tuple[str, ...] = ()
    response_line: ResponseLine | None = None
    samples: bool = False
    requests_per_item: int = 1
    fits_hint: str = ""

    @property
    def pools(self) -> bool:
        """Whether its engines run vLLM's pooling runner (they sample nothing)."""
        return self.runner == "pooling"

    @property
    def scores(self) -> bool:
        """Whether its rows go through vLLM's scoring processor (a pair, or a query's documents)."""
        return self.call in ("score", "rerank")

    @property
    def classifies(self) -> bool:
        """Whether its pooling output is a classifier's probabilities (else vectors)."""
        return self.serves == "classify"

    def refusal(self, option: str, where: str | None = None) -> str | None:
        """Why a job of this task refuses `option` (naming it `where`), or None if it applies."""
        if option in self.options:
            return None
        having = [t for t in JOB_TASKS.values() if option in t.options]
        return OPTIONS[option].format(
            where=where or option, job=self.job, task=self.name, having=_jobs(having),
            has="has" if len(having) == 1 else "have",
        )  # fmt: skip

    def row_budget(self, row: RowRequest, max_tokens: int) -> int:
        """The most engine steps a row may take: generated tokens (its `max_tokens`, else
        the job's, times `n`), or one per pooling request."""
        if self.samples:
            return int(row.sampling.get("max_tokens", max_tokens)) * int(row.sampling.get("n", 1))
        items = len(row.inputs or row.documents or ()) or 1
        return items * self.requests_per_item

    def failed_row(self, message: str) -> dict[str, Any]:
        """An engine call's row of this task that carries only an error."""
        row: dict[str, Any] = dict.fromkeys(self.row_columns)
        row[ERROR] = message
        return row


def _jobs(tasks: list[JobTask]) -> str:
    if len(tasks) == 1:
        return f"{tasks[0].job} (--task {tasks[0].name})"
    names = [t.name for t in tasks]
    return f"{', '.join(names[:-1])} and {names[-1]} jobs"


_POOLING_OPTIONS = frozenset({"truncate_prompt_tokens"})

#: Every task, by name, in the order the command lists them.
JOB_TASKS: dict[str, JobTask] = {
    t.name: t
    for t in (
        JobTask(
            name="generate",
            job="a generation job",
            runner="generate",
            serves="generate",
            call="generate",
            row_columns=(TEXT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS, ERROR, CHOICES),
            output_columns=(
                CUSTOM_ID,
                TEXT,
                FINISH_REASON,
                PROMPT_TOKENS,
                COMPLETION_TOKENS,
                ERROR,
                KIND,
                CHOICES,
            ),
            schema=schema.generation_schema,
            options=frozenset({"export", "requests"}),
            row_extras={KIND: "kind"},
            endpoints=("/v1/chat/completions", "/v1/completions"),
            response_line=output_line,
            samples=True,
            fits_hint="; a warm pool started with the pooling runner does not generate",
        ),
        JobTask(
            name="embed",
            job="an embedding job",
            runner="pooling",
            serves="embed",
            call="pool",
            row_columns=(EMBEDDING, PROMPT_TOKENS, ERROR, EMBEDDINGS),
            output_columns=(CUSTOM_ID, EMBEDDING, PROMPT_TOKENS, ERROR, EMBEDDINGS, ENCODING_FORMAT),
            schema=schema.embedding_schema,
            options=_POOLING_OPTIONS | {"export", "embed"},
            row_extras={ENCODING_FORMAT: "encoding_format"},
            endpoints=("/v1/embeddings",),
            response_line=embedding_line,
        ),
        JobTask(
            name="classify",
            job="a classification job",
            runner="pooling",
            serves="classify",
            call="pool",
            row_columns=(LABEL, PROBS, PROMPT_TOKENS, ERROR),
            output_columns=(CUSTOM_ID, LABEL, PROBS, PROMPT_TOKENS, ERROR),
            schema=schema.classification_schema,
            options=_POOLING_OPTIONS,
            fits_hint="; a classifier is a *ForSequenceClassification model "
            "(`prefect-vllm make-tiny-model DIR --classes a,b` makes a tiny one)",
        ),
        JobTask(
            name="score",
            job="a scoring job",
            runner="pooling",
            serves="score",
            call="score",
            row_columns=(SCORE, PROMPT_TOKENS, ERROR),
            output_columns=(CUSTOM_ID, SCORE, PROMPT_TOKENS, ERROR),
            schema=schema.score_schema,
            options=_POOLING_OPTIONS | {"pair_column"},
            pair_column=PAIR_COLUMN,
            build_row=_pair_of,
            requests_per_item=2,  # an embedding model embeds both texts
            fits_hint="; vLLM scores with a cross-encoder (a classifier of one label: "
            "`prefect-vllm make-tiny-model DIR --classes relevance` makes a tiny one) or an embedding model",
        ),
        JobTask(
            name="rerank",
            job="a rerank job",
            runner="pooling",
            serves="score",
            call="rerank",
            row_columns=(RESULTS, PROMPT_TOKENS, ERROR),
            output_columns=(CUSTOM_ID, RESULTS, PROMPT_TOKENS, ERROR),
            schema=schema.rerank_schema,
            options=_POOLING_OPTIONS | {"export", "pair_column"},
            text_column=QUERY,
            pair_column=DOCUMENTS,
            build_row=_documents_of,
            extra_columns=(TOP_N,),
            endpoints=("/v1/rerank", "/rerank", "/v2/rerank"),
            response_line=rerank_line,
            requests_per_item=2,  # an embedding model embeds the query and the document
            fits_hint="; vLLM reranks with a cross-encoder (a classifier of one label: "
            "`prefect-vllm make-tiny-model DIR --classes relevance` makes a tiny one) or an embedding model",
        ),
    )
}

#: The job task each OpenAI Batch url's requests need.
ENDPOINT_TASKS: dict[str, str] = {url: t.name for t in JOB_TASKS.values() for url in t.endpoints}


def job_task(name: str | None) -> JobTask:
    """The entry of task `name` (None: `generate`).

    Raises:
        ConfigurationError: No such task, naming the ones there are.
    """
    entry = JOB_TASKS.get(name or "generate")
    if entry is None:
        from prefect_vllm.exceptions import ConfigurationError

        raise ConfigurationError(f"task: {name!r} is not one of {', '.join(map(repr, JOB_TASKS))}")
    return entry
