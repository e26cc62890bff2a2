#!/usr/bin/env bash
# Audio–text curation: basic duration and silence filters, then a CLAP audio-text score.
#
# Follows the shape of audio-caption pipelines such as WavCaps and LAION-Audio-630K: drop
# clips that are too short or mostly silent (librosa RMS below -60 dBFS over more than half
# the frames), embed audio and captions with LAION CLAP, and keep the pairs whose cosine is at
# least MIN_SCORE. CLAP scores live in their own band: MIN_SCORE (default 0.1) is a starting
# point to tune on a sample with `mmtools stats -c audio_text_score`, not a published value.
#
# Usage: recipes/audio_curation.sh INPUT OUTPUT [FILTER OPTION...]
#   INPUT   a folder of audio clips with .txt captions (or anything `mmtools ingest` reads)
# Environment: AUDIO_MODEL (default laion/clap-htsat-unfused, or a local directory),
#   MIN_SCORE (default 0.1), MIN_DURATION (default 1), MMTOOLS (default: mmtools)
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
$MMTOOLS ingest "$input" -q \
    | $MMTOOLS filter --min-duration "${MIN_DURATION:-1}" --max-silence 0.5 -q \
    | $MMTOOLS score --media audio --audio-model "${AUDIO_MODEL:-laion/clap-htsat-unfused}" -q \
    | $MMTOOLS filter --where "audio_text_score >= ${MIN_SCORE:-0.1}" -o "$output" "$@"
