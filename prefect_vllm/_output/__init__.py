"""Writing a job's output: part-file schemas and tables, OpenAI Batch response lines, exports."""
