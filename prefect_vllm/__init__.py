"""prefect-vllm: resumable offline LLM batch inference with Prefect, Ray and vLLM.

Importing this package is light: it imports neither vLLM, torch nor Ray (Prefect
imports every collection at start-up through its entry point). The blocks, which
need Prefect itself, load on first use, or at once when Prefect is already loaded
(Prefect's collection loader then registers them): so `prefect-vllm` can answer a
no-op resume or a refusal without paying for Prefect's import.

Examples:
    ```python
    import prefect_vllm

    print(prefect_vllm.__version__)
    ```
"""

import sys
from typing import TYPE_CHECKING, Any

from prefect_vllm._version import __version__
from prefect_vllm.exceptions import (
    ConfigurationError,
    EngineCrashedError,
    EngineError,
    EngineStartError,
    EngineUnavailableError,
    FingerprintMismatchError,
    IncompleteJobError,
    InputError,
    JobRunningError,
    PrefectVllmError,
    StorageError,
)

if TYPE_CHECKING:
    from prefect_vllm.blocks import CheckpointStorage, RayCluster, VllmModel

_BLOCKS = ("CheckpointStorage", "RayCluster", "VllmModel")

__all__ = [
    "CheckpointStorage",
    "ConfigurationError",
    "EngineCrashedError",
    "EngineError",
    "EngineStartError",
    "EngineUnavailableError",
    "FingerprintMismatchError",
    "IncompleteJobError",
    "InputError",
    "JobRunningError",
    "PrefectVllmError",
    "RayCluster",
    "StorageError",
    "VllmModel",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _BLOCKS:
        from prefect_vllm import blocks

        return getattr(blocks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if "prefect" in sys.modules:
    from prefect_vllm.blocks import CheckpointStorage, RayCluster, VllmModel
