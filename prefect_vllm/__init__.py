"""prefect-vllm: resumable offline LLM batch inference with Prefect, Ray and vLLM.

Importing this package is light: it imports neither vLLM, torch nor Ray (Prefect
imports every collection at start-up through its entry point).

Examples:
    ```python
    import prefect_vllm

    print(prefect_vllm.__version__)
    ```
"""

from prefect_vllm._version import __version__
from prefect_vllm.blocks import CheckpointStorage, RayCluster, VllmModel
from prefect_vllm.exceptions import (
    ConfigurationError,
    EngineError,
    EngineStartError,
    EngineUnavailableError,
    FingerprintMismatchError,
    IncompleteJobError,
    InputError,
    JobRunningError,
    PrefectVllmError,
)

__all__ = [
    "CheckpointStorage",
    "ConfigurationError",
    "EngineError",
    "EngineStartError",
    "EngineUnavailableError",
    "FingerprintMismatchError",
    "IncompleteJobError",
    "InputError",
    "JobRunningError",
    "PrefectVllmError",
    "RayCluster",
    "VllmModel",
    "__version__",
]
