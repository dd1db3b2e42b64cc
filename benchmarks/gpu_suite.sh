#!/usr/bin/env bash
# The prepared GPU run of issue 10 (see benchmarks/gpu_suite.py): one JSON, <= 8 minutes on one GPU.
# Usage (repository root, ../shared/official present):  bash benchmarks/gpu_suite.sh [OUT_DIR]
set -u
OUT=${1:-${OUT:-gpu_suite_out}}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_suite.py --out "$OUT" --budget-s "${BUDGET_S:-450}"
