#!/usr/bin/env bash
# LAION-Aesthetics subsets: aesthetic, NSFW and watermark thresholds over CLIP embeddings.
#
# Reproduces the filters of LAION's aesthetic subsets of LAION-5B (LAION-AI/laion-datasets,
# laion-aesthetic.md): "laion-aesthetic" keeps the rows with aesthetic > 7, pwatermark < 0.8
# and punsafe < 0.5 (about 120M rows); "laion-art" is the same with aesthetic > 8
# (AESTHETIC_MIN=8). LAION computed the three scores as follows:
#   aesthetic   its linear aesthetic predictor on OpenAI CLIP ViT-L/14 image embeddings
#               (sa_0_4_vit_l_14_linear.pth, LAION-AI/aesthetic-predictor); the later improved
#               predictor (sac+logos+ava1-l14-linearMSE.pth) loads as well
#   punsafe     its CLIP-based NSFW detector on the same embeddings
#               (clip_ViT-L-14_openai_binary_nsfw_head.pth, LAION-AI/CLIP-based-NSFW-Detector)
#   pwatermark  its watermark detector, an EfficientNet over the pixels rather than a head
#               over embeddings, which mmtools does not run: pass a watermark head trained
#               with `mmtools train-head` (see train_quality_head.sh), or none, and the rule
#               is left out.
# Each head is applied to L2-normalised image embeddings; a head made for another model than
# the embeddings' is refused.
#
# Usage: recipes/laion_subsets.sh INPUT OUTPUT [FILTER OPTION...]
#   INPUT   an mmtools dataset; images are embedded first (MODEL, PRETRAINED) unless it has
#           image_embedding
#   OUTPUT  the dataset directory to write; extra options go to `mmtools filter`
# Environment:
#   AESTHETIC_HEAD, NSFW_HEAD, WATERMARK_HEAD   local head files (at least one)
#   AESTHETIC_MIN (7), PUNSAFE_MAX (0.5), PWATERMARK_MAX (0.8)   LAION's thresholds
#   MODEL, PRETRAINED   model for missing embeddings (default ViT-L-14 / openai, what
#                       LAION's heads expect)
#   MMTOOLS     the mmtools command line (default: mmtools)
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT OUTPUT [FILTER OPTION...] (see the comment at its top)" >&2
    exit 2
fi
input=$1 output=$2
shift 2
MMTOOLS=${MMTOOLS:-mmtools}
MODEL=${MODEL-ViT-L-14}
PRETRAINED=${PRETRAINED-openai}

heads=() rules=()
if [ -n "${AESTHETIC_HEAD:-}" ]; then
    heads+=(--head "aesthetic=$AESTHETIC_HEAD")
    rules+=("aesthetic > ${AESTHETIC_MIN:-7}")
fi
if [ -n "${NSFW_HEAD:-}" ]; then
    heads+=(--head "punsafe=$NSFW_HEAD")
    rules+=("punsafe < ${PUNSAFE_MAX:-0.5}")
fi
if [ -n "${WATERMARK_HEAD:-}" ]; then
    heads+=(--head "pwatermark=$WATERMARK_HEAD")
    rules+=("pwatermark < ${PWATERMARK_MAX:-0.8}")
fi
if [ ${#heads[@]} -eq 0 ]; then
    echo "$0: set AESTHETIC_HEAD, NSFW_HEAD and/or WATERMARK_HEAD to local head files" >&2
    exit 2
fi
where=$(printf ' AND %s' "${rules[@]}")
where=${where# AND }

model=()
if ! $MMTOOLS info "$input" --json | grep -q '"name": "image_embedding"'; then
    model=(--model "$MODEL" ${PRETRAINED:+--pretrained "$PRETRAINED"})
fi
$MMTOOLS score "$input" "${heads[@]}" "${model[@]}" --no-clip-score -q \
    | $MMTOOLS filter - --where "$where" -o "$output" "$@"
