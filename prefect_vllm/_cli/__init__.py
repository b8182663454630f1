"""The `prefect-vllm` command's parts: flags, `run`, `pool`, and the head start."""
