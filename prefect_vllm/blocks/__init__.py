"""Prefect blocks: persisted, shareable settings (model, Ray cluster, checkpoint storage)."""

from prefect_vllm.blocks.model import VllmModel
from prefect_vllm.blocks.ray import RayCluster
from prefect_vllm.blocks.storage import CheckpointStorage

__all__ = ["CheckpointStorage", "RayCluster", "VllmModel"]
