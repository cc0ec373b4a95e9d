#!/usr/bin/env bash
# topoclip on real images: scikit-learn's handwritten digits, three embedding spaces, three
# training seeds each; then the table of docs/real-data.md (mean ± std over the seeds).
#
#   bash examples/digits.sh [OUT_DIR] [STEPS]        # defaults: runs/digits-example, 300 steps
#
# Each run trains on the CSV of captioned digits (10% of its images held out for the
# validation loss) and is evaluated on the digits suite: zero-shot (10 classes, 3 templates),
# retrieval on the test captions, and a linear probe.
set -euo pipefail
out=${1:-runs/digits-example}
steps=${2:-300}
topoclip data digits --out "$out/data"
declare -A spaces=(
  [sphere]="topology.name=sphere"
  [ob16x8-inner]="topology.name=oblique-inner topology.n=16 topology.m=8"
  [ob16x8-geodesic]="topology.name=oblique-geodesic topology.n=16 topology.m=8"
)
for name in sphere ob16x8-inner ob16x8-geodesic; do
  for seed in 0 1 2; do
    if [ -f "$out/runs/$name-seed$seed/results.json" ]; then continue; fi
    # train.precision=fp32: the table in docs/real-data.md was measured in fp32 (the default, auto,
    # is bf16 on AMX CPUs and GPUs)
    # shellcheck disable=SC2086
    topoclip train data.source=csv data.csv.path="$out/data/train.tsv" data.csv.holdout=0.1 \
      eval.suite_file="$out/data/suite.yaml" ${spaces[$name]} train.steps="$steps" train.seed="$seed" \
      logging.progress=false train.precision=fp32 output.dir="$out/runs" output.name="$name-seed$seed"
  done
done
python "$(dirname "$0")/summarize_runs.py" "$out/runs" | tee "$out/table.md"
