"""The README's automation example is a deployment trigger Prefect accepts, on our event."""

from __future__ import annotations

import re
from pathlib import Path

from prefect_vllm.flows._events import PREFIX, job_resource_id
from tests.helpers import readme_trigger

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_trigger_is_valid_and_expects_our_completed_event() -> None:
    section = README.read_text().split("### Events for automations", 1)[1].split("\n## ", 1)[0]
    trigger = readme_trigger()
    assert trigger.expect == {f"{PREFIX}.job.completed"}
    pattern = trigger.match.model_dump()["prefect.resource.id"]
    assert re.fullmatch(pattern.replace(".", r"\.").replace("*", ".*"), job_resource_id("abc123"))
    # Every event the README documents is one the code can emit.
    documented = set(re.findall(r"\| `(prefect-vllm\.[a-z.]+)` \|", section))
    emitted = set(
        re.findall(
            r'"((?:job|shard|row|engine)\.[a-z]+)"',
            (Path(__file__).resolve().parents[2] / "prefect_vllm/flows/_events.py").read_text(),
        )
    )
    assert documented == {f"{PREFIX}.{name}" for name in emitted}
