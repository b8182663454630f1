"""What the pooling tests share: their inputs, and raw vLLM's answers to them.

Raw vLLM is the reference every embed, classify, score and rerank test compares with. Its
answers are computed once per model per test run (`RawVllm`): the first test process
to ask runs one `LLM(...)` for the model and answers every call asked of it so far;
the other waits for the file and reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import REPO

#: Classes of the session's tiny classifier (`make-tiny-model --classes`).
CLASSES = ("negative", "neutral", "positive")

#: One raw `LLM(...)` answering a list of calls on one model, in its own process:
#: `embed`, `classify` and `score` with their keyword arguments, each output reduced
#: to what the tests compare (the vector, probabilities or score, and prompt tokens),
#: and `generate` (its keyword arguments are `SamplingParams`'; the text).
_RAW = """
import json, os, sys
if __name__ == "__main__":
    from vllm import LLM
    from prefect_vllm.config import EngineConfig
    spec = json.load(open(sys.argv[1]))
    os.environ.update(spec["env"])
    llm = LLM(**{**EngineConfig().engine_kwargs(spec["model"], on_cpu=True), **spec["llm"]})
    field = {"embed": "embedding", "classify": "probs", "score": "score"}
    answers = {}
    for name, call in spec["calls"].items():
        if call["op"] == "generate":
            from vllm import SamplingParams
            outputs = llm.generate(call["args"][0], SamplingParams(**call["kwargs"]), use_tqdm=False)
            answers[name] = [[o.outputs[0].text, len(o.prompt_token_ids)] for o in outputs]
            continue
        outputs = getattr(llm, call["op"])(*call["args"], use_tqdm=False, **call["kwargs"])
        answers[name] = [[getattr(o.outputs, field[call["op"]]), len(o.prompt_token_ids)] for o in outputs]
    with open(sys.argv[2], "w") as f:
        json.dump(answers, f)
    # The engine stopped, no interpreter teardown: it can abort in a C++ thread ("terminate called").
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)
"""


def embed_prompts(path: Path) -> Path:
    """The embedding test's 40 texts, and a chat row (an embedding job's row error)."""
    write_sample_prompts(path, n=40, seed=5)
    with path.open("a") as f:
        f.write(json.dumps({"custom_id": "chat-1", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return path


def classify_prompts(path: Path) -> Path:
    """The classification test's 24 texts, and one longer than the model's context."""
    write_sample_prompts(path, n=24, seed=9)
    with path.open("a") as f:
        f.write(json.dumps({"custom_id": "too-long", "prompt": "cat dog bird " * 1000}) + "\n")
    return path


def score_pairs(path: Path) -> Path:
    """The scoring test's 24 query/document pairs, one without a document, one too long."""
    rows: list[dict[str, Any]] = [
        {
            "custom_id": f"q{i}",
            "query": f"how many legs has animal {i}?",
            "document": f"animal {i} has {i % 5} legs",
        }
        for i in range(24)
    ]
    rows.append({"custom_id": "no-document", "query": "anything?", "document": None})
    rows.append({"custom_id": "too-long", "query": "anything?", "document": "cat dog bird " * 1000})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's records."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RawVllm:
    """Raw vLLM's answers, one `LLM(...)` per model for the whole test run.

    Args:
        root: A folder every test process of the run shares.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def own(self, name: str) -> Path:
        """A file of this test process's own in the shared folder (two may write inputs at once)."""
        return self.root / f"{os.getpid()}-{name}"

    def answers(
        self,
        model: Path,
        llm: dict[str, Any],
        calls: dict[str, dict[str, Any]],
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Raw vLLM's answers to `calls` on `model` built with `llm` keyword arguments.

        Args:
            calls: name -> `{"op": "embed" | "classify" | "score" | "generate", "args":
                [...], "kwargs": {...}}`; each answer is a list of `[value,
                prompt_tokens]` in the order of the inputs.
            env: Environment variables the raw engine needs (`VLLM_CPU_OMP_THREADS_BIND`).
        """
        from filelock import FileLock

        spec = {"model": str(model), "llm": llm, "calls": calls, "env": env or {}}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        spec_file, answer_file = self.root / f"{key}.spec.json", self.root / f"{key}.json"
        with FileLock(str(self.root / f"{key}.lock")):
            if not answer_file.exists():
                spec_file.write_text(json.dumps(spec))
                (self.root / "raw.py").write_text(_RAW)
                raw = subprocess.run(
                    [sys.executable, str(self.root / "raw.py"), str(spec_file), str(answer_file) + ".tmp"],
                    capture_output=True, text=True, timeout=600, cwd=REPO,
                )  # fmt: skip
                assert raw.returncode == 0, raw.stderr[-3000:]
                Path(str(answer_file) + ".tmp").rename(answer_file)
        answers: dict[str, Any] = json.loads(answer_file.read_text())
        return answers


def call(op: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One call for `RawVllm.answers`."""
    return {"op": op, "args": list(args), "kwargs": kwargs}


def _by_id(ids: list[str], answers: list[Any]) -> dict[str, Any]:
    assert len(ids) == len(answers), (len(ids), len(answers))
    return dict(zip(ids, answers, strict=True))


def tiny_llama_answers(raw: RawVllm, model: Path) -> dict[str, dict[str, Any]]:
    """The tiny Llama as an embedding model (vLLM's pooling runner converts it): the
    embedding test's vectors and the scoring test's cosine scores, by custom id."""
    texts = [r for r in records(embed_prompts(raw.own("embed.jsonl"))) if "prompt" in r]
    pairs = _scorable(score_pairs(raw.own("pairs.jsonl")))
    answers = raw.answers(
        model,
        {"runner": "pooling", "convert": "embed"},
        {
            "embed": call("embed", [r["prompt"] for r in texts]),
            "score": call("score", [r["query"] for r in pairs], [r["document"] for r in pairs]),
        },
    )
    return {
        "embed": _by_id([r["custom_id"] for r in texts], answers["embed"]),
        "score": _by_id([r["custom_id"] for r in pairs], answers["score"]),
    }


def classifier_answers(raw: RawVllm, model: Path) -> dict[str, dict[str, Any]]:
    """The tiny classifier's probabilities: `plain` for the rows that fit (vLLM refuses
    the whole call else), `cut` for every row cut to 6 tokens, by custom id."""
    rows = records(classify_prompts(raw.own("classify.jsonl")))
    fits = [r for r in rows if r["custom_id"] != "too-long"]
    answers = raw.answers(
        model,
        {"runner": "pooling"},
        {
            "plain": call("classify", [r["prompt"] for r in fits]),
            "cut": call(
                "classify", [r["prompt"] for r in rows], tokenization_kwargs={"truncate_prompt_tokens": 6}
            ),
        },
    )
    return {
        "plain": _by_id([r["custom_id"] for r in fits], answers["plain"]),
        "cut": _by_id([r["custom_id"] for r in rows], answers["cut"]),
    }


def rerank_queries(path: Path) -> Path:
    """The rerank test's 12 queries of 2-5 documents each (some keep only their best
    `top_n`), and three rows that are row errors."""
    rows: list[dict[str, Any]] = [
        {
            "custom_id": f"r{i}",
            "query": f"which animal has {i % 4} legs?",
            "documents": [f"animal {i + j} has {(i + j) % 4} legs" for j in range(2 + i % 4)],
            **({"top_n": 2} if i % 3 == 0 else {}),
        }
        for i in range(12)
    ]
    rows.append({"custom_id": "no-documents", "query": "anything?", "documents": []})
    rows.append({"custom_id": "not-a-text", "query": "anything?", "documents": ["a cat", 7]})
    rows.append({"custom_id": "bad-top-n", "query": "anything?", "documents": ["a cat"], "top_n": -1})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cross_encoder_answers(raw: RawVllm, model: Path) -> dict[str, Any]:
    """The tiny cross-encoder's scores of the scoring test's pairs, by custom id."""
    return _cross_encoder(raw, model)["score"]


def cross_encoder_rerank_answers(raw: RawVllm, model: Path) -> dict[str, list[Any]]:
    """The tiny cross-encoder's score of each rerank query against each of its documents
    (as `LLM.score(query, documents)` scores them: one pair each), by custom id, in
    document order."""
    return _cross_encoder(raw, model)["rerank"]


def _cross_encoder(raw: RawVllm, model: Path) -> dict[str, Any]:
    """Both cross-encoder references from one raw `LLM(...)` (one spec, one engine start)."""
    pairs = _scorable(score_pairs(raw.own("pairs.jsonl")))
    queries = [r for r in records(rerank_queries(raw.own("rerank.jsonl"))) if r["custom_id"].startswith("r")]
    flat = [(r["custom_id"], r["query"], d) for r in queries for d in r["documents"]]
    answers = raw.answers(
        model,
        {"runner": "pooling"},
        {
            "score": call("score", [r["query"] for r in pairs], [r["document"] for r in pairs]),
            "rerank": call("score", [q for _, q, _ in flat], [d for _, _, d in flat]),
        },
    )
    by_query: dict[str, list[Any]] = {}
    for (custom_id, _, _), answer in zip(flat, answers["rerank"], strict=True):
        by_query.setdefault(custom_id, []).append(answer)
    return {"score": _by_id([r["custom_id"] for r in pairs], answers["score"]), "rerank": by_query}


def _scorable(path: Path) -> list[dict[str, Any]]:
    """The pairs raw vLLM can score in one call (a null or over-long document fails it)."""
    return [r for r in records(path) if r["document"] and r["custom_id"] != "too-long"]
