#!/usr/bin/env bash
# DataComp CLIP-score baseline: the top 30% of the pool by CLIP score.
#
# Reproduces the "CLIP score (B/32, 30%)" / "(L/14, 30%)" filtering baselines of DataComp
# (Gadre et al., "DataComp: In search of the next generation of multimodal datasets",
# NeurIPS 2023, section 4; mlfoundations/datacomp baselines.py --name clip_score_b32_30_percent):
# rank the whole pool by the image-text cosine similarity and keep the best 30%. The fraction
# is of the whole input, found exactly in two passes that hold only the score and id columns
# (a piped stream is spooled to a temporary file between them). DataComp's script keeps every
# row scoring at least the (floor(0.3 N) + 1)-th best score; mmtools keeps exactly
# floor(0.3 N) rows, breaking ties by the smaller id.
#
# Usage: recipes/datacomp_top30.sh INPUT OUTPUT [FILTER OPTION...]
#   INPUT   an mmtools dataset (e.g. made by `mmtools ingest`); it is scored first unless it
#           already has a clip_score column
#   OUTPUT  the dataset directory to write; extra options go to `mmtools filter`
#           (e.g. --overwrite, --preset datacomp-basic to intersect with the basic filter)
# Environment:
#   MODEL       open_clip model for scoring (default ViT-B-32; DataComp also used ViT-L-14)
#   PRETRAINED  its checkpoint tag or file (default laion2b_s34b_b79k; set it empty to use the
#               model's own weights, e.g. MODEL=mmtools-shapes PRETRAINED= for the offline one)
#   FRACTION    the fraction kept (default 0.3)
#   MMTOOLS     the mmtools command line (default: mmtools)
# Rerun on a finished OUTPUT, it changes nothing and exits 0, pipes and pipefail included; a
# run that rejects every row exits 7 after committing (mmtools' fail-safe).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT OUTPUT [FILTER OPTION...] (see the comment at its top)" >&2
    exit 2
fi
input=$1 output=$2
shift 2
MMTOOLS=${MMTOOLS:-mmtools}
MODEL=${MODEL-ViT-B-32}
PRETRAINED=${PRETRAINED-laion2b_s34b_b79k}
FRACTION=${FRACTION:-0.3}

schema=$($MMTOOLS info "$input" --json)
if grep -q '"name": "clip_score"' <<<"$schema"; then
    $MMTOOLS filter "$input" --top-fraction "$FRACTION" --by clip_score -o "$output" "$@"
else
    $MMTOOLS score "$input" --model "$MODEL" ${PRETRAINED:+--pretrained "$PRETRAINED"} -q \
        | $MMTOOLS filter - --top-fraction "$FRACTION" --by clip_score -o "$output" "$@"
fi
