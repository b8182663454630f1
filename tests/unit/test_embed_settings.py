"""An embedding job's settings, identity and output shape: pure logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prefect_vllm._engine.protocol import GenerateResult
from prefect_vllm._engine.vllm_io import failed_row
from prefect_vllm._input.planning import InputColumns, InputFile
from prefect_vllm._input.requests import plain_row
from prefect_vllm._job import JobIdentity, job_identity
from prefect_vllm._job_tasks import job_task
from prefect_vllm._output.table import output_table
from prefect_vllm.config import EmbedConfig, EngineConfig, RequestConfig, SamplingConfig
from prefect_vllm.exceptions import ConfigurationError
from prefect_vllm.flows._resolve import check_task


def _identity(
    tmp_path: Path,
    task: str = "generate",
    embed: EmbedConfig | None = None,
    sampling: SamplingConfig | None = None,
) -> JobIdentity:
    files = [InputFile(path=str(tmp_path / "in.jsonl"), format="jsonl", size=10, mtime_ns=1)]
    return job_identity(
        "m", files, InputColumns(), 8, sampling or SamplingConfig(), EngineConfig(), RequestConfig(), None,
        task=task, embed=embed,
    )  # fmt: skip


def test_an_embedding_job_is_another_job_runs_the_pooling_runner_and_ignores_sampling(tmp_path: Path) -> None:
    generate = _identity(tmp_path)
    assert _identity(tmp_path, task="generate") == generate, "a generation job keeps its id"
    embed = _identity(tmp_path, task="embed")
    assert embed.job_id != generate.job_id
    assert embed.fingerprint["task"] == "embed" and "sampling.max_tokens" not in embed.fingerprint
    assert embed.engine.engine_args["runner"] == "pooling"
    assert "runner" not in generate.engine.engine_args
    other_sampling = _identity(tmp_path, task="embed", sampling=SamplingConfig(max_tokens=3))
    assert other_sampling.job_id == embed.job_id, "sampling does not change an embedding"
    fewer = _identity(tmp_path, task="embed", embed=EmbedConfig(dimensions=32))
    assert fewer.job_id != embed.job_id and fewer.fingerprint["embed.dimensions"] == 32


def test_embed_options_become_pooling_params() -> None:
    assert EmbedConfig().pooling_params() == {}
    assert EmbedConfig(dimensions=8, normalize=False).pooling_params() == {
        "dimensions": 8,
        "use_activation": False,
    }
    with pytest.raises(ValueError, match="dimensions"):
        EmbedConfig(dimensions=0)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"requests": RequestConfig(json_schema={"type": "object"})}, "requests"),
    ],
)
def test_what_an_embedding_job_cannot_do_is_refused_naming_the_parameter(
    kwargs: dict[str, object], named: str
) -> None:
    given: dict[str, object] = {"export": None, "requests": RequestConfig(), **kwargs}
    check_task("generate", **given)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=f"^{named}:"):
        check_task("embed", **given)  # type: ignore[arg-type]


def test_an_embedding_job_exports_to_openai_and_a_classification_job_does_not() -> None:
    check_task("embed", export="openai", requests=RequestConfig())
    with pytest.raises(
        ConfigurationError, match=r"^export: the OpenAI Batch API has completion and embedding"
    ):
        check_task("classify", export="openai", requests=RequestConfig())


def test_an_embedding_shard_has_its_own_columns() -> None:
    EMBED_ROW_COLUMNS = job_task("embed").row_columns
    assert job_task("generate").row_columns != EMBED_ROW_COLUMNS
    error = failed_row("bad", "embed")
    assert error == {"embedding": None, "prompt_tokens": None, "error": "bad", "embeddings": None}
    GenerateResult(columns={k: [None] for k in EMBED_ROW_COLUMNS}, pid=1, seconds=0.1, task="embed")
    with pytest.raises(ValueError, match="lacks"):
        GenerateResult(columns={k: [None] for k in EMBED_ROW_COLUMNS}, pid=1, seconds=0.1)
    rows = [plain_row("a", None, None, custom_id="r1"), plain_row("b", None, None, custom_id="r2")]
    table = output_table(rows, {"embedding": [[0.5, 0.25], None], "prompt_tokens": [2, None],
                                "error": [None, "bad"], "embeddings": [None, None]}, "embed")  # fmt: skip
    assert tuple(table.column_names) == job_task("embed").output_columns
    assert str(table.schema.field("embedding").type) == "list<item: float>"
    assert table.to_pylist()[0] == {
        "custom_id": "r1",
        "embedding": [0.5, 0.25],
        "prompt_tokens": 2,
        "error": None,
        "embeddings": None,
        "encoding_format": None,
    }


def test_a_classification_row_names_its_most_likely_class() -> None:
    from types import SimpleNamespace

    from prefect_vllm._engine.vllm_io import class_names, classification_row

    assert class_names(SimpleNamespace(id2label={0: "LABEL_0", 1: "LABEL_1"})) is None
    assert class_names(SimpleNamespace(id2label={0: "no", 1: "yes"})) == ["no", "yes"]
    assert class_names(SimpleNamespace()) is None
    final = SimpleNamespace(
        outputs=SimpleNamespace(data=[0.2, 0.7, 0.1]), prompt_token_ids=[1, 2, 3], error=None
    )
    assert classification_row(final, ["a", "b", "c"]) == {
        "label": "b", "probs": [0.2, 0.7, 0.1], "prompt_tokens": 3, "error": None,
    }  # fmt: skip
    assert classification_row(final, None)["label"] == "1", "unnamed classes: the index"
    refused = SimpleNamespace(outputs=None, prompt_token_ids=[], error="too long")
    assert classification_row(refused, None)["error"] == "the engine refused the row: too long"


def test_a_classification_job_is_its_own_job_on_the_pooling_runner(tmp_path: Path) -> None:
    classify = _identity(tmp_path, task="classify")
    assert classify.fingerprint["task"] == "classify" and classify.engine.engine_args["runner"] == "pooling"
    assert not any(k.startswith(("embed.", "sampling.")) for k in classify.fingerprint)
    assert classify.job_id not in (_identity(tmp_path).job_id, _identity(tmp_path, task="embed").job_id)
    assert job_task("classify").row_columns == ("label", "probs", "prompt_tokens", "error")
    with pytest.raises(ConfigurationError, match=r"^task:"):
        check_task("translate", export=None, requests=RequestConfig())


def test_a_scoring_job_reads_text_pairs_and_anything_else_is_a_row_error(tmp_path: Path) -> None:
    from prefect_vllm._input.planning import plan_job
    from prefect_vllm._input.requests import with_pair
    from prefect_vllm.exceptions import InputError

    scored = with_pair(plain_row("q", None, None), "d", "doc")
    assert scored.pair == "d" and scored.payload() == {"prompt": "q", "pair": "d"}
    assert (
        with_pair(plain_row("q", None, None), "", "doc").error
        == "doc: the pair's second text must be a string, got empty"
    )
    assert (
        with_pair(plain_row("q", None, None), 3, "doc").error
        == "doc: the pair's second text must be a string, got int"
    )
    assert (
        with_pair(plain_row([1, 2], None, None), "d", "doc").error
        == "prompt: a score job reads text, not token ids"
    )
    chat = plain_row(None, [{"role": "user", "content": "hi"}], None)
    assert with_pair(chat, "d", "doc").error == "a score job reads text pairs, not chat messages"
    assert (
        with_pair(plain_row(None, None, None), "d", "doc").error
        == "prompt must be a string or token ids, got null"
    )

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "doc": "d"}\n{"prompt": "q2"}\n')
    with pytest.raises(
        InputError, match=r"line 2, column 'doc': missing the field of the pair's second text"
    ):
        plan_job(str(path), InputColumns(pair="doc"), 8)
    assert plan_job(str(path), InputColumns(), 8).rows_total == 2, "only a scoring job needs the pair"


def test_a_scoring_job_is_its_own_job_and_names_its_pair_column(tmp_path: Path) -> None:
    files = [InputFile(path=str(tmp_path / "in.jsonl"), format="jsonl", size=10, mtime_ns=1)]

    def identity(columns: InputColumns, task: str) -> JobIdentity:
        return job_identity(
            "m", files, columns, 8, SamplingConfig(), EngineConfig(), RequestConfig(), None, task=task
        )

    score = identity(InputColumns(pair="doc"), "score")
    assert score.fingerprint["pair_column"] == "doc" and score.fingerprint["task"] == "score"
    assert score.engine.engine_args["runner"] == "pooling"
    assert identity(InputColumns(pair="other"), "score").job_id != score.job_id
    assert "pair_column" not in identity(InputColumns(), "generate").fingerprint
    assert job_task("score").row_columns == ("score", "prompt_tokens", "error")
    with pytest.raises(ConfigurationError, match=r"^export: .* a scoring job's output is its part files"):
        check_task("score", export="openai", requests=RequestConfig())


def test_a_prompt_cut_is_a_pooling_jobs_option_and_part_of_its_identity(tmp_path: Path) -> None:
    files = [InputFile(path=str(tmp_path / "in.jsonl"), format="jsonl", size=10, mtime_ns=1)]

    def identity(cut: int | None) -> JobIdentity:
        return job_identity(
            "m", files, InputColumns(), 8, SamplingConfig(), EngineConfig(), RequestConfig(), None,
            task="embed", truncate_prompt_tokens=cut,
        )  # fmt: skip

    assert "truncate_prompt_tokens" not in identity(None).fingerprint
    assert (
        identity(16).fingerprint["truncate_prompt_tokens"] == 16
        and identity(16).job_id != identity(None).job_id
    )
    given: dict[str, Any] = {"export": None, "requests": RequestConfig()}
    for task in ("embed", "classify", "score"):
        check_task(task, **given, truncate_prompt_tokens=-1)
    with pytest.raises(
        ConfigurationError, match=r"^truncate_prompt_tokens: only embed, classify, score and rerank jobs cut"
    ):
        check_task("generate", **given, truncate_prompt_tokens=8)
    for bad in (0, -2):
        with pytest.raises(ConfigurationError, match=r"^truncate_prompt_tokens: keep N >= 1 tokens, or -1"):
            check_task("embed", **given, truncate_prompt_tokens=bad)


def test_engines_that_cannot_do_the_jobs_task_are_refused_with_a_way_out() -> None:
    from prefect_vllm.flows._ray import _check_serves

    _check_serves("m", "embed", _answers({"tasks": ["embed", "score"]}))
    _check_serves("m", "embed", _answers({"pid": 1}))  # an actor that does not say: it is let through
    with pytest.raises(
        ConfigurationError,
        match=r"""^task: m cannot embed: vLLM serves generate with it; a warm pool's engines embed, classify or score when the pool is started with --engine-args '\{"runner": "pooling"\}'$""",
    ):
        _check_serves("m", "embed", _answers({"tasks": ["generate"]}), warm=True)
    with pytest.raises(ConfigurationError, match=r'leave "runner" out of the engine arguments$'):
        _check_serves("m", "embed", _answers({"tasks": ["generate"]}))
    with pytest.raises(
        ConfigurationError, match=r"^task: m cannot generate: vLLM serves embed with it; a warm pool started"
    ):
        _check_serves("m", "generate", _answers({"tasks": ["embed"]}), warm=True)
    with pytest.raises(
        ConfigurationError,
        match=r"^task: m cannot generate: vLLM serves classify, score with it; run it with --task classify$",
    ):
        _check_serves("m", "generate", _answers({"tasks": ["classify", "score"]}))
    with pytest.raises(
        ConfigurationError, match=r"^task: m cannot classify: vLLM serves embed with it; a classifier is"
    ):
        _check_serves("m", "classify", _answers({"tasks": ["embed"]}))


def test_a_pooling_job_is_the_same_job_on_its_own_engines_and_on_a_pooling_warm_pool(tmp_path: Path) -> None:
    files = [InputFile(path=str(tmp_path / "in.jsonl"), format="jsonl", size=10, mtime_ns=1)]

    def identity(engine: EngineConfig, task: str) -> JobIdentity:
        return job_identity(
            "m", files, InputColumns(), 8, SamplingConfig(), engine, RequestConfig(), None, task=task
        )

    pooling_pool = EngineConfig(engine_args={"runner": "pooling"})
    assert identity(pooling_pool, "embed").job_id == identity(EngineConfig(), "embed").job_id
    assert identity(pooling_pool, "embed").engine.engine_args == {"runner": "pooling"}
    assert identity(pooling_pool, "generate").job_id != identity(EngineConfig(), "generate").job_id


def test_a_cut_longer_than_the_engines_context_is_refused_before_any_shard() -> None:
    from prefect_vllm.flows._ray import _check_serves

    infos = _answers({"tasks": ["embed"], "max_model_len": 1024})
    _check_serves("m", "embed", infos, cut=1024)
    _check_serves("m", "embed", infos, cut=-1)
    with pytest.raises(
        ConfigurationError, match=r"^truncate_prompt_tokens: 2000 is more than m's context of 1024 tokens"
    ):
        _check_serves("m", "embed", infos, cut=2000)


def _answers(*answers: dict[str, Any]) -> list[Any]:
    """Engine actors' answers to `info()` (an older actor's dict too) as the flow reads them."""
    from prefect_vllm._engine.protocol import EngineInfo

    return [EngineInfo.of({"pid": 1, **answer}) for answer in answers]
