#!/usr/bin/env bash
# Drop the rows whose image matches unwanted text queries ("a watermark", "text", ...).
#
# clip-retrieval's `filter --query` finds the images closest to a text query in CLIP space;
# here each query is embedded by the model that made the image embeddings (`mmtools score
# --query`), and a row is dropped when its image's cosine with any query is at least MAX_SIM.
# Cosines are raw, in [-1, 1], and their scale depends on the model: look at the columns
# q1, q2, ... (kept in the output) with `mmtools stats` before settling on a threshold; for
# OpenAI's ViT-B/32 a matching concept typically scores 0.25-0.35.
#
# Usage: recipes/query_filter.sh INPUT OUTPUT [FILTER OPTION...]
#   INPUT   an mmtools dataset; images are embedded first (MODEL, PRETRAINED) unless it has
#           image_embedding
#   OUTPUT  the dataset directory to write; extra options go to `mmtools filter`
#           (e.g. --invert to see what was dropped)
# Environment:
#   QUERIES     one query per line (default: a watermark, text, a logo)
#   MAX_SIM     drop at this cosine or above (default 0.25)
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
QUERIES=${QUERIES:-$'a watermark\ntext\na logo'}
MAX_SIM=${MAX_SIM:-0.25}

args=() rules=() n=0
while IFS= read -r query; do
    [ -n "$query" ] || continue
    n=$((n + 1))
    args+=(--query "$query" --query-name "q$n")
    rules+=("q$n < $MAX_SIM")
done <<<"$QUERIES"
if [ "$n" -eq 0 ]; then
    echo "$0: QUERIES is empty" >&2
    exit 2
fi
where=$(printf ' AND %s' "${rules[@]}")
where=${where# AND }

model=()
if ! $MMTOOLS info "$input" --json | grep -q '"name": "image_embedding"'; then
    model=(--model "$MODEL" ${PRETRAINED:+--pretrained "$PRETRAINED"})
fi
$MMTOOLS score "$input" "${args[@]}" "${model[@]}" --no-clip-score -q \
    | $MMTOOLS filter - --where "$where" -o "$output" "$@"
