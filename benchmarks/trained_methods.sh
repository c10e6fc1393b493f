#!/usr/bin/env bash
# The trained methods at small scale (STF's Fig. 1 / Table 5 question and VoCo-LLaMA), on vtcshapes:
# fine-tune the shipped vtc-tiny with each method (`vtcbench train --init vtc-tiny`), evaluate each
# trained folder with `vtcbench run`, run the training-free methods on the shipped model at the same
# 16-token budget (a quarter of its 64 visual tokens), and print the report.
#   bash benchmarks/trained_methods.sh OUT   (OUT must not exist; STEPS=300 by default)
set -euo pipefail
out=${1:?usage: bash benchmarks/trained_methods.sh OUT}
steps=${STEPS:-300}
[ ! -e "$out" ] || { echo "$out exists; choose a new folder" >&2; exit 2; }
mkdir -p "$out/models"
train() {  # NAME METHOD [--set ...]: fine-tune, then evaluate the folder through vtcbench run
  local name=$1; shift
  vtcbench train --init vtc-tiny --method "$@" --steps "$steps" --lr 1e-3 --time-every 0 --out "$out/models/$name"
  vtcbench run --model "$out/models/$name" --method "$@" --out "$out/runs"
}
train stf stf
train tokenconcat tokenconcat
train avgpool avgpool
train voco2 voco --set voco_tokens=2
train voco16 voco --set voco_tokens=16
vtcbench run --method vanilla --out "$out/runs"
vtcbench run --method avgpool --out "$out/runs"
vtcbench run --method llavolta --set layer=0 --set stride=4 --out "$out/runs"
vtcbench run --method kmeans --set layer=0 --set clusters=16 --out "$out/runs"
vtcbench run --method random --set layer=0 --set drop_ratio=0.75 --out "$out/runs"
vtcbench run --method fastv --set layer=1 --set drop_ratio=0.75 --out "$out/runs"
vtcbench report --results "$out/runs" --allow-mixed --metrics color,presence,count,text,overall
