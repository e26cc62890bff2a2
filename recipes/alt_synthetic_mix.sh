#!/usr/bin/env bash
# AltText + synthetic caption hybrid: caption every image with a VLM, keep both captions.
#
# Follows "Revisit Large-Scale Image-Caption Data in Pre-training Multimodal Foundation Models"
# (Apple, 2024) and VeCLIP: hybrids of alt-text and synthetic captions beat either alone, so
# every row keeps its alt-text (text_original) and its synthetic caption (text_synthetic), and
# `text` holds one of them per row (synthetic with probability MIX, seeded by row id).
#
# Usage: recipes/alt_synthetic_mix.sh INPUT OUTPUT [REWRITE OPTION...]
# Environment: BACKEND (default openai; `template` runs offline), BASE_URL, MODEL (a VLM, e.g.
#   Qwen/Qwen2-VL-7B-Instruct), MIX (default 0.5), MMTOOLS (default: mmtools)
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT OUTPUT [REWRITE OPTION...] (see the comment at its top)" >&2
    exit 2
fi
input=$1 output=$2
shift 2
MMTOOLS=${MMTOOLS:-mmtools}
BACKEND=${BACKEND:-openai}
server=()
if [ "$BACKEND" = openai ]; then
    server=(--base-url "${BASE_URL:-http://127.0.0.1:8000/v1}" --model "${MODEL:-Qwen/Qwen2-VL-7B-Instruct}")
fi
$MMTOOLS rewrite "$input" --mode caption --prompt caption_hint --backend "$BACKEND" "${server[@]}" \
    --mix "${MIX:-0.5}" --seed 0 -o "$output" "$@"
