#!/usr/bin/env bash
# The demo: GPT-2 made tensor + sequence parallel on 2 CPU ranks (gloo), trained a few steps
# beside the unmodified model, then the plan, an annotated graph excerpt and the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "${PORT:-29531}" \
  examples/train_gpt2.py "$@"
