#!/usr/bin/env bash
# LaCLIP-style caption rewriting with an LLM behind an OpenAI-compatible server.
#
# Reproduces the rewriting step of LaCLIP (Fan et al., "Improving CLIP Training with Language
# Rewrites", NeurIPS 2023): an LLM rewrites each alt-text, prompted with a few examples of
# rewrites (recipes/prompts/rewrite_examples.txt), and training samples either text. The
# original alt-text is kept in text_original; --mix 0.5 puts the rewrite into `text` for half
# of the rows (seeded per row), as the AltText/synthetic hybrid studies recommend.
#
# Usage: recipes/laclip_rewrite.sh INPUT OUTPUT [REWRITE OPTION...]
# Environment: BASE_URL (default http://127.0.0.1:8000/v1, e.g. `vllm serve MODEL`),
#   MODEL (default Qwen/Qwen2.5-7B-Instruct), OPENAI_API_KEY if the server needs one,
#   MIX (default 0.5), CONCURRENCY (default 32), MMTOOLS (default: mmtools)
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT OUTPUT [REWRITE OPTION...] (see the comment at its top)" >&2
    exit 2
fi
input=$1 output=$2
shift 2
MMTOOLS=${MMTOOLS:-mmtools}
here=$(cd "$(dirname "$0")" && pwd)
$MMTOOLS rewrite "$input" --mode rewrite --backend openai \
    --base-url "${BASE_URL:-http://127.0.0.1:8000/v1}" --model "${MODEL:-Qwen/Qwen2.5-7B-Instruct}" \
    --examples "$here/prompts/rewrite_examples.txt" --concurrency "${CONCURRENCY:-32}" \
    --mix "${MIX:-0.5}" --seed 0 -o "$output" "$@"
