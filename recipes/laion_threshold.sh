#!/usr/bin/env bash
# LAION-style CLIP-score threshold filtering.
#
# Reproduces the rules LAION-5B applied to its English pairs (Schuhmann et al., "LAION-5B",
# NeurIPS 2022, section 3): drop alt-text shorter than 5 characters and images smaller than
# 5 KB, then keep pairs whose CLIP ViT-B/32 image-text cosine similarity is at least 0.28
# (LAION-400M used 0.3). DataComp's "laion" baseline uses the same 0.28 cut. These are the
# rules of `mmtools filter --preset laion`, which also keeps only English captions when the
# data has a `language` column. The 0.28 was calibrated on OpenAI's ViT-B/32 weights
# (PRETRAINED=openai); other checkpoints put cosines on a slightly different scale.
#
# Usage: recipes/laion_threshold.sh INPUT OUTPUT [FILTER OPTION...]
#   INPUT   an mmtools dataset (e.g. made by `mmtools ingest`); it is scored first unless it
#           already has a clip_score column
#   OUTPUT  the dataset directory to write; extra options go to `mmtools filter`
#           (e.g. --overwrite, --invert)
# Environment:
#   MODEL       open_clip model for scoring (default ViT-B-32)
#   PRETRAINED  its checkpoint tag or file (default openai, as LAION used; set it empty to use the
#               model's own weights, e.g. MODEL=mmtools-shapes PRETRAINED= for the offline one)
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
PRETRAINED=${PRETRAINED-openai}

schema=$($MMTOOLS info "$input" --json)
if grep -q '"name": "clip_score"' <<<"$schema"; then
    $MMTOOLS filter "$input" --preset laion -o "$output" "$@"
else
    $MMTOOLS score "$input" --model "$MODEL" ${PRETRAINED:+--pretrained "$PRETRAINED"} -q \
        | $MMTOOLS filter - --preset laion -o "$output" "$@"
fi
