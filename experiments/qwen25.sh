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
# The sweep sized to the 90 minutes (the training part takes ~50): the 12 gaps the study grows, three scales,
# 512 held-out tokens (a Qwen forward is mostly its 151,936 x 896 lm_head), four arms.
python "$experiments/layer_quality.py" --target qwen25 --arms avg,copy-A,opt-structured,lesa --only-top-gaps \
    --scales 1,0.25,0.1 --eval-tokens 512 --out "$out/layer_quality_qwen25"
end=$(date +%s)
echo "qwen25: training part $((middle - start)) s, layer quality $((end - middle)) s, total $((end - start)) s"
