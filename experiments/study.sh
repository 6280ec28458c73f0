#!/usr/bin/env bash
# The whole CPU study of docs/RESULTS.md (issue 13), sized for 90 minutes on 2 cores: the embedded
# part, then the SmolLM2-135M part (it needs the checkpoint tests/smollm2.py converts), each with two
# worker processes. Measured time, hardware and results: docs/RESULTS.md.
#
#     bash experiments/study.sh [OUT]      # default OUT: study-out; writes OUT/compare and OUT/smollm2
set -euo pipefail
out=${1:-study-out}
experiments=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
# --threads 2: the shared base trains alone in the main process before the workers start; on two
# idle cores two threads take 0.157 s a step where one takes 0.267 (measured: docs/RESULTS.md).
python "$experiments/compare.py" --preset study --jobs 2 --threads 2 --out "$out/compare"
middle=$(date +%s)
python "$experiments/smollm2.py" --preset study --jobs 2 --out "$out/smollm2"
end=$(date +%s)
echo "study: embedded part $((middle - start)) s, SmolLM2 part $((end - middle)) s, total $((end - start)) s;" \
     "results in $out/compare/summary.md and $out/smollm2/summary.md"
