"""Thin orchestration: the `batch_inference` flow."""

from prefect_vllm.flows.batch import batch_inference

__all__ = ["batch_inference"]
