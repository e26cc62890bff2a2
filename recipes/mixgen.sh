#!/usr/bin/env bash
# MixGen augmentation: new image-text pairs from blended images and joined captions.
#
# Reproduces MixGen (Hao et al., "MixGen: A New Multi-Modal Data Augmentation", WACV 2023):
# for a share of the batch, blend two images with a fixed lambda = 0.5 and concatenate their
# captions; the paper mixes a quarter of each batch (M = B/4). mmtools writes the mixed rows as
# new samples with provenance (mixup_parents, mixup_lambda) beside the originals, once, offline.
#
# Usage: recipes/mixgen.sh INPUT OUTPUT [MIXUP OPTION...]
# Environment: FRACTION (default 0.25), SEED (default 0), MMTOOLS (default: mmtools)
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT OUTPUT [MIXUP OPTION...] (see the comment at its top)" >&2
    exit 2
fi
input=$1 output=$2
shift 2
MMTOOLS=${MMTOOLS:-mmtools}
$MMTOOLS mixup "$input" --mode image-text --lam 0.5 --fraction "${FRACTION:-0.25}" \
    --seed "${SEED:-0}" --keep-originals -o "$output" "$@"
