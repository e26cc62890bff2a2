#!/usr/bin/env bash
# A cron-ready incremental job: curate only the input shards that arrived since the last run.
#
# Each new WebDataset tar (or folder) in INBOX becomes one curated dataset under
# OUTPUT/curated/<name>: ingest | embed | score | filter | dedup. The dedup runs against
# OUTPUT/seen, a dedup index of every row kept by earlier runs, so an image that arrived last
# week and again today is kept once; each run adds its kept rows' keys to it after its output
# commits (`mmtools info OUTPUT/seen` shows what it holds). mmtools' own resume makes a killed
# run pick up where it stopped, and its output lock (exit 5) plus the flock below make sure two
# cron runs never overlap. One log line per run goes to OUTPUT/cron.log, naming each shard that
# failed with the pipeline's exit code (pipefail: the last stage that failed). A shard whose
# every row was rejected is committed and logged as failed with code 7 (mmtools' fail-safe),
# once: the next run sees it complete. A stage whose reader leaves exits 0, so a pipeline
# rerun on a finished shard is a success that writes nothing.
#
#   */30 * * * * /path/to/recipes/cron_incremental.sh /data/inbox /data/curated
#
# Usage: recipes/cron_incremental.sh INBOX OUTPUT
# Environment: MODEL, PRETRAINED (default ViT-B-32 / laion2b_s34b_b79k), WHERE (default
#   "clip_score >= 0.28", LAION's threshold for ViT-B/32), DEDUP (default "-m exact -m phash":
#   the dedup methods; the index keeps the ones it was made with), MMTOOLS (default: mmtools)
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 INBOX OUTPUT (see the comment at its top)" >&2
    exit 2
fi
inbox=$1 output=$2
MMTOOLS=${MMTOOLS:-mmtools}
MODEL=${MODEL-ViT-B-32}
PRETRAINED=${PRETRAINED-laion2b_s34b_b79k}
WHERE=${WHERE:-clip_score >= 0.28}
DEDUP=${DEDUP:--m exact -m phash}
mkdir -p "$output/curated"
exec 9>"$output/.cron.lock"
if ! flock -n 9; then
    echo "$(date -Is) skipped: the previous run is still going" >>"$output/cron.log"
    exit 0
fi
start=$(date +%s) done=0 failed=0 failures=""
for shard in "$inbox"/*; do
    name=$(basename "$shard")
    name=${name%.tar}
    target=$output/curated/$name
    [ -f "$target/_manifest.json" ] && continue
    code=0
    $MMTOOLS ingest "$shard" -q \
        | $MMTOOLS embed --model "$MODEL" ${PRETRAINED:+--pretrained "$PRETRAINED"} -q \
        | $MMTOOLS score -q \
        | $MMTOOLS filter --where "$WHERE" -q \
        | $MMTOOLS dedup $DEDUP --index "$output/seen" --max-drop-rate 1 -o "$target" -q \
        || code=$?
    if [ "$code" -eq 0 ]; then
        done=$((done + 1))
    else
        failed=$((failed + 1)) failures="$failures $name:$code"
    fi
done
echo "$(date -Is) curated $done new shard(s), $failed failed${failures:+ (shard:exit$failures)}," \
    "$(( $(date +%s) - start )) s" >>"$output/cron.log"
[ "$failed" -eq 0 ]
