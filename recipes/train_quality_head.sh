#!/usr/bin/env bash
# Train a quality head on a few hundred labelled rows, then score and filter every row.
#
# The probe approach of DataComp-style curation and of LAION's own aesthetic and NSFW heads:
# label a few hundred rows by hand (a LABEL column: 1 or true for rows to keep, 0 or false
# for rows to drop, null for the rest, e.g. set in a notebook on a sample from
# `mmtools head`), train a logistic regression on their image embeddings (`mmtools
# train-head`, which prints its cross-validated AUC: check it before trusting the head), score
# every row with it (`mmtools score --head quality=...`: P(keep)) and keep the rows scoring
# at least MIN_SCORE. The same works for any defect you can label: watermarks, blur, text.
#
# Usage: recipes/train_quality_head.sh INPUT OUTPUT [FILTER OPTION...]
#   INPUT   an mmtools dataset with a LABEL column; images are embedded first (MODEL,
#           PRETRAINED) unless it has image_embedding
#   OUTPUT  the dataset directory to write; extra options go to `mmtools filter`
# Environment:
#   LABEL       the label column (default: label)
#   MIN_SCORE   keep rows whose quality is at least this (default 0.5)
#   KIND        logistic, linear or mlp (default logistic)
#   HEAD        where the head is written (default: OUTPUT.head.safetensors, beside OUTPUT)
#   MODEL, PRETRAINED   model for missing embeddings (default ViT-B-32 / laion2b_s34b_b79k;
#               MODEL=mmtools-shapes PRETRAINED= runs offline)
#   MMTOOLS     the mmtools command line (default: mmtools)
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
LABEL=${LABEL:-label}
MIN_SCORE=${MIN_SCORE:-0.5}
KIND=${KIND:-logistic}
HEAD=${HEAD:-${output%/}.head.safetensors}

data=$input
if ! $MMTOOLS info "$input" --json | grep -q '"name": "image_embedding"'; then
    # train-head and score both read the embeddings: keep them for the two passes.
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    data=$work/embedded
    $MMTOOLS embed "$input" --modalities image --model "$MODEL" \
        ${PRETRAINED:+--pretrained "$PRETRAINED"} -o "$data" -q
fi
$MMTOOLS train-head "$data" --label "$LABEL" --kind "$KIND" -o "$HEAD" --overwrite
$MMTOOLS score "$data" --head "quality=$HEAD" --no-clip-score -q \
    | $MMTOOLS filter - --where "quality >= $MIN_SCORE" -o "$output" "$@"
