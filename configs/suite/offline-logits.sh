#!/usr/bin/env bash
# kd from offline teacher logits vs the live teacher on the embedded suite (results/offline-logits.md).
#   bash configs/suite/offline-logits.sh [SEEDS]     # SEEDS: a compare seed list, default [0]
set -euo pipefail
SEEDS=${1:-[0]}
OUT=runs/offline-logits
# 1. The demo's data, teacher and SFT student, and kd with the live teacher (which samples the teacher once on D's
#    prompts into OUT/cache: those samples are the sequences every kd run here trains on).
prefkd compare --config configs/suite/offline-logits.yaml methods=[kd] "seeds=$SEEDS"
# 2. The teacher's top-k log-probs on those sequences, once per k.
SAMPLES=$(ls $OUT/cache/teacher-*.jsonl)
for K in 8 32 128; do
  prefkd teacher-logits --model $OUT/teacher/model --data $OUT/data/d_prompts.jsonl --samples "$SAMPLES" \
    --top-k $K --out $OUT/logits/top$K
done
# 3. kd from each cache, both tail modes, against the live kd (stages of step 1 are reused).
prefkd compare --config configs/suite/offline-logits.yaml "seeds=$SEEDS" \
  "methods=[kd,kd-top8,kd-top32,kd-top128,kd-top8-bucket,kd-top32-bucket,kd-top128-bucket]"
