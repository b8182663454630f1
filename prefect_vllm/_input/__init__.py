"""Input rows: files planned into shards, rows into engine requests, OpenAI Batch files, LoRA adapters, the column names."""
