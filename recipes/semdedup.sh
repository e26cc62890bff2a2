#!/usr/bin/env bash
# SemDeDup: semantic de-duplication in CLIP embedding space.
#
# Reproduces SemDeDup (Abbas et al., "SemDeDup: Data-efficient learning at web-scale through
# semantic deduplication", 2023): k-means on normalised image embeddings, then within each
# cluster every pair with cosine similarity above 1 - eps is a duplicate, and one row of each
# group is kept. The paper clusters LAION-440M into 50,000 clusters and reports eps between
# 0.0005 and 0.07; this recipe defaults to eps = 0.05 and lets dedup pick about rows/1000
# clusters. It keeps the row with the highest clip_score when the input has one.
#
# Usage: recipes/semdedup.sh INPUT OUTPUT [DEDUP OPTION...]
#   INPUT   an mmtools dataset; embedded first unless it has image_embedding
# Environment: MODEL, PRETRAINED (default ViT-B-32 / laion2b_s34b_b79k; MODEL=mmtools-shapes
#   PRETRAINED= runs offline), EPS (default 0.05), MMTOOLS (default: mmtools)
# Rerun on a finished OUTPUT, it changes nothing and exits 0, pipes and pipefail included; a
# run that rejects every row exits 7 after committing (mmtools' fail-safe).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT OUTPUT [DEDUP OPTION...] (see the comment at its top)" >&2
    exit 2
fi
input=$1 output=$2
shift 2
MMTOOLS=${MMTOOLS:-mmtools}
MODEL=${MODEL-ViT-B-32}
PRETRAINED=${PRETRAINED-laion2b_s34b_b79k}
EPS=${EPS:-0.05}

schema=$($MMTOOLS info "$input" --json)
keep=first
if grep -q '"name": "clip_score"' <<<"$schema"; then keep=highest:clip_score; fi
if grep -q '"name": "image_embedding"' <<<"$schema"; then
    $MMTOOLS dedup "$input" -m semantic --eps "$EPS" --keep "$keep" -o "$output" "$@"
else
    $MMTOOLS embed "$input" --modalities image --model "$MODEL" \
        ${PRETRAINED:+--pretrained "$PRETRAINED"} -q \
        | $MMTOOLS dedup - -m semantic --eps "$EPS" --keep "$keep" -o "$output" "$@"
fi
