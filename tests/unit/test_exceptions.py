"""Every error survives the trip between processes (a shard task's failure reaches the flow through Ray)."""

from __future__ import annotations

import pickle

import pytest

from prefect_vllm import exceptions as ex

EXAMPLES = [
    ex.ConfigurationError("shard_size: must be at least 1"),
    ex.InputError("not valid JSON", path="/data/in.jsonl", line=7, column="prompt"),
    ex.FingerprintMismatchError("changed: sampling.max_tokens (64 -> 32)", changed=["sampling.max_tokens"]),
    ex.EngineStartError("the engine did not start"),
    ex.EngineCrashedError("the engine of actor 1 died", actor_index=1, hung=True),
    ex.EngineUnavailableError("no live actor"),
    ex.EngineUnavailableError("no live vLLM engine actor is left out of 2", for_good=True),
    ex.IncompleteJobError("2 of 9 shards were not committed", incomplete=["000001", "000007"]),
    ex.JobRunningError("job x is already running"),
    ex.StorageError("/out/part-000003.parquet", "[Errno 28] No space left on device"),
]


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_an_error_pickles_with_its_message_and_attributes(error: ex.PrefectVllmError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error) and again.args == error.args
    assert vars(again) == vars(error)
    assert again.retryable == error.retryable


def test_a_storage_error_is_an_os_error_naming_the_location_and_the_reason() -> None:
    error = ex.StorageError("/out/part-000003.parquet", "[Errno 28] No space left on device")
    assert isinstance(error, OSError)
    assert str(error) == "cannot write /out/part-000003.parquet: [Errno 28] No space left on device"
    assert not error.retryable
