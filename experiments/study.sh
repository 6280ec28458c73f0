#!/usr/bin/env bash
# The whole CPU study of docs/RESULTS.md (issues 13 and 21), sized for 90 minutes on 2 cores: the SmolLM2-135M
# part, then the embedded part, each with two worker processes. SmolLM2 goes first because it is the
# part that needs files besides this repository (the checkpoint tests/smollm2.py converts, the Austen
# novels): if one is missing, the study stops in seconds, not after the 40-minute embedded part.
# Measured time, hardware and results: docs/RESULTS.md.
#
#     bash experiments/study.sh [OUT]      # default OUT: study-out; writes OUT/smollm2 and OUT/compare
set -euo pipefail
out=${1:-study-out}
experiments=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
python "$experiments/smollm2.py" --preset study --jobs 2 --out "$out/smollm2"
middle=$(date +%s)
# --threads 2: the shared base trains alone in the main process before the workers start; on two
# idle cores two threads take 0.157 s a step where one takes 0.267 (measured: docs/RESULTS.md).
python "$experiments/compare.py" --preset study --jobs 2 --threads 2 --out "$out/compare"
end=$(date +%s)
echo "study: SmolLM2 part $((middle - start)) s, embedded part $((end - middle)) s, total $((end - start)) s;" \
     "results in $out/smollm2/summary.md and $out/compare/summary.md"
