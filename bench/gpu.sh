#!/usr/bin/env bash
# The GPU check, one prepared command for the first time a GPU is lent (within 10 minutes on one H100):
# the real case (256 training pairs at real lengths, 10 % held out, max_length 1024) on a 1B-class Llama in
# bf16, the anneal stage against plain TRL, two repeats; prints the table, MFU, peak GPU memory and the
# padding shares, and writes them to $OUT/gpu-real.json (OUT defaults to the current folder).
#
#   bash bench/gpu.sh            # with the project installed beside a CUDA build of torch
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 600 python bench/gpu_anneal_vs_trl.py --real --modes full --repeats 2 --json "$out/gpu-real.json"
