"""Prefect blocks: persisted, shareable settings (model, Ray cluster, checkpoint storage)."""

from prefect_vllm.blocks.model import VllmModel

__all__ = ["VllmModel"]
