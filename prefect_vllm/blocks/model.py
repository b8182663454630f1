"""The `VllmModel` block: a model and how its engines are built, saved once, reused by name."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from prefect_vllm.blocks._logo import _LOGO_URL
from prefect_vllm.config import EngineConfig, SamplingConfig


class VllmModel(Block):
    """A vLLM model: its id or folder, revision, dtype and engine arguments.

    Examples:
        Save a model once, then load it by name in any flow:

        ```python
        from prefect_vllm.blocks import VllmModel

        VllmModel(model="/models/tiny-llama", engine_args={"max_num_seqs": 64}).save(
            "tiny", overwrite=True
        )
        block = VllmModel.load("BLOCK_NAME")
        engine = block.engine_config()
        ```
    """

    _block_type_name = "vLLM Model"
    _logo_url = _LOGO_URL  # type: ignore[assignment]
    _documentation_url = "https://docs.vllm.ai/en/latest/configuration/engine_args.html"  # type: ignore[assignment]
    _description = "A model for prefect-vllm batch jobs, and how its vLLM engines are built."

    model: str = Field(description="Hugging Face model id or local model folder.")
    revision: str | None = Field(default=None, description="Model revision; default the latest.")
    dtype: str | None = Field(default=None, description="Weights dtype; default float32 on CPU, auto on GPU.")
    max_model_len: int | None = Field(
        default=None, description="Longest prompt plus completion in tokens; default the model's."
    )
    tensor_parallel_size: int = Field(default=1, description="GPUs per engine.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM engine arguments, applied last."
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="Default sampling for jobs on this model; the fields a job's sampling sets win.",
    )
    hf_token: SecretStr | None = Field(
        default=None, description="Hugging Face token for gated models; never logged."
    )

    def engine_config(self) -> EngineConfig:
        """The per-run engine settings this block describes (the token is not included)."""
        return EngineConfig(
            revision=self.revision,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            tensor_parallel_size=self.tensor_parallel_size,
            engine_args=self.engine_args,
        )
