#!/usr/bin/env bash
# Install everything, make a tiny model offline, write sample prompts, run a batch job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
demo=.demo
.venv/bin/prefect-vllm make-tiny-model "$demo/model" >/dev/null
.venv/bin/python -c "from prefect_vllm.testing import write_sample_prompts; write_sample_prompts('$demo/prompts.jsonl', n=256)"
.venv/bin/prefect-vllm run "$demo/prompts.jsonl" --output "$demo/output" --model "$demo/model" \
  --max-tokens 24 --shard-size 64 --restart
.venv/bin/python - "$demo/output" <<'PY'
import sys, pyarrow.dataset as ds
table = ds.dataset(sys.argv[1], format="parquet", exclude_invalid_files=True).to_table()
print(f"\n{table.num_rows} rows in {sys.argv[1]}/part-*.parquet; the first three")
print("(the tiny model has random weights: it writes random tokens, so the texts are nonsense):")
for row in table.sort_by("custom_id").slice(0, 3).to_pylist():
    print(f"  {row['custom_id']}: {row['text']!r} ({row['completion_tokens']} tokens, {row['finish_reason']})")
PY
