"""Thin Prefect tasks: generating and committing one shard."""

from prefect_vllm.tasks.shards import ShardJob, run_shard

__all__ = ["ShardJob", "run_shard"]
