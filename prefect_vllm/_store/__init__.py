"""The output location: checkpoints and commits, the job lock, exports."""
