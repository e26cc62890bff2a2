#!/usr/bin/env bash
# Image-based filtering: keep the pool rows whose image lies near a reference set.
#
# After DataComp's "image-based" baseline (Gadre et al., "DataComp: In search of the next
# generation of multimodal datasets", NeurIPS 2023, section 4 and appendix; mlfoundations/
# datacomp baselines.py --name image_based), which keeps the pool samples whose image
# embedding falls in a cluster that ImageNet-1k training images fall in. DataComp clusters
# the pool (100,000 k-means centres of CLIP ViT-L/14 image embeddings) and keeps the clusters
# nearest to the reference images; this recipe turns that around, as the reference is
# usually much smaller than the pool: it clusters the REFERENCE into K centres (faiss
# k-means, `mmtools index --kmeans K`) and keeps the pool rows whose nearest centre has a
# cosine of at least MIN_SIM (`mmtools filter --near`). The rows dropped are counted as
# `near`; rows without a usable embedding become reject rows. Check the threshold with
# `mmtools filter ... --invert` and `mmtools sheet` before trusting it.
#
# Usage: recipes/datacomp_image_filter.sh POOL REFERENCE OUTPUT [FILTER OPTION...]
#   POOL       the mmtools dataset to filter; embedded first unless it has image_embedding
#   REFERENCE  a dataset of the images to stay near (e.g. ImageNet's training images),
#              embedded first (into OUTPUT.reference) unless it has image_embedding
#   OUTPUT     the dataset directory to write; the centres go to OUTPUT.centroids (an index,
#              reused when the recipe runs again); extra options go to `mmtools filter`
# Environment:
#   MODEL, PRETRAINED  the open_clip model for embedding (default ViT-B-32 with
#              laion2b_s34b_b79k; DataComp used ViT-L-14; MODEL=mmtools-shapes PRETRAINED=
#              runs offline). Pool and reference must be embedded by the same model.
#   K          reference centres (default 1000; at most the reference's rows)
#   MIN_SIM    the least cosine to the nearest centre that is kept (default 0.6)
#   SEED       k-means seed (default 0)
#   MMTOOLS    the mmtools command line (default: mmtools)
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 POOL REFERENCE OUTPUT [FILTER OPTION...] (see the comment at its top)" >&2
    exit 2
fi
pool=$1 reference=$2 output=$3
shift 3
MMTOOLS=${MMTOOLS:-mmtools}
MODEL=${MODEL-ViT-B-32}
PRETRAINED=${PRETRAINED-laion2b_s34b_b79k}
K=${K:-1000}
MIN_SIM=${MIN_SIM:-0.6}
SEED=${SEED:-0}
embed=($MMTOOLS embed --modalities image --model "$MODEL" ${PRETRAINED:+--pretrained "$PRETRAINED"} -q)

has_embedding() { $MMTOOLS info "$1" --json | grep -q '"name": "image_embedding"'; }

if ! has_embedding "$reference"; then
    "${embed[@]}" "$reference" -o "$output.reference"
    reference=$output.reference
fi
$MMTOOLS index "$reference" -o "$output.centroids" --kmeans "$K" --seed "$SEED" -q

if has_embedding "$pool"; then
    $MMTOOLS filter "$pool" --near "$output.centroids" --min-sim "$MIN_SIM" -o "$output" "$@"
else
    "${embed[@]}" "$pool" \
        | $MMTOOLS filter - --near "$output.centroids" --min-sim "$MIN_SIM" -o "$output" "$@"
fi
