#!/usr/bin/env bash
# The study's second real model (issue 31): Qwen2.5-Coder-0.5B-Instruct grown 24 -> 36 in the top half (the
# no-growth control, llama-pro, avg-zero, opt-structured, lesa; 3 seeds; held-out loss on Emma, which no training
# run reads; paired 95 % intervals), then the layer-quality sweep on it. Needs the folder tests/qwen.py converts
# (~/.cache/opt-deus/qwen2.5-coder-0.5b-instruct-hf) and ../shared/data/austen. Measured time: docs/RESULTS.md.
#
#     bash experiments/qwen25.sh [OUT]      # default OUT: study-out; writes OUT/qwen25 and OUT/layer_quality_qwen25
set -euo pipefail
out=${1:-study-out}
experiments=$(cd "$(dirname "$0")" && pwd)
base=${QWEN25:-${OPT_DEUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/opt-deus}/qwen2.5-coder-0.5b-instruct-hf}
start=$(date +%s)
python "$experiments/smollm2.py" --preset qwen25 --base "$base" --no-accuracy --out "$out/qwen25"
middle=$(date +%s)
python "$experiments/layer_quality.py" --target qwen25 --arms avg,copy-A,copy-B,opt-structured,lesa \
    --out "$out/layer_quality_qwen25"
end=$(date +%s)
echo "qwen25: training part $((middle - start)) s, layer quality $((end - middle)) s, total $((end - start)) s"
